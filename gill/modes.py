"""The three training modes (DESIGN §1): each maps ``(model, batch)`` to ``{"loss", ...metrics}``.

* ``captioning``  — image -> visual prefix -> frozen ChatGLM -> next-token CE on the caption;
* ``retrieval``   — caption + ``[IMG]`` -> ChatGLM -> text projection vs image projection,
  symmetric InfoNCE with negatives gathered from every rank;
* ``generation``  — GILL mapper regression to ChatGLM's caption encoding + the diffusion noise
  loss through the frozen UNet with the spatial adapter.

Each mode builds its own graph so the trainer can run forward -> backward -> free per mode.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gill.chatglm import embed_tokens, lm_logits, run_chatglm

SLOT = -1  # placeholder id: "an adapter embedding goes here"
IGNORE = -100


def assemble_inputs(model, sequences: list[list[int]], slot_embeds: torch.Tensor, labels=None):
    """Left-pad id sequences, embed them, and fill the ``SLOT`` positions with ``slot_embeds``.

    ``slot_embeds`` is ``[B, m, H]`` with ``m`` slots per sequence, filled in order. Returns
    ``(inputs_embeds [B, S, H], attention_mask [B, S], labels [B, S] on the CPU, or None)``.
    """
    width = max(len(s) for s in sequences)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE, dtype=torch.long) if labels is not None else None
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        if labels is not None:
            lab[i, width - len(seq):] = torch.tensor(labels[i])
    ids, mask = model.upload(ids), model.upload(mask)
    slots = ids == SLOT
    embeds = embed_tokens(model.text_encoder, ids.clamp(min=0))
    embeds = embeds.masked_scatter(slots[..., None], slot_embeds.to(embeds.dtype))
    return embeds, mask, lab  # labels stay on the host: the loss picks its positions there


def _prefix(model) -> list[int]:
    return model.tokenizer.get_prefix_tokens()  # [gMASK], sop


def _caption_ids(model, caption: str) -> list[int]:
    return model.tokenizer.encode(caption, add_special_tokens=False)[: model.caption_max_tokens]


def captioning(model, batch: dict) -> dict:
    feats = model.vision_features(batch)
    prefix = model.adapter.prefix_embeds(feats)
    k, eos = prefix.shape[1], model.tokenizer.eos_token_id
    seqs, labels = [], []
    for caption in batch["captions"]:
        text = _caption_ids(model, caption) + [eos]
        head = _prefix(model) + [SLOT] * k
        seqs.append(head + text)
        labels.append([IGNORE] * len(head) + text)
    embeds, mask, labels = assemble_inputs(model, seqs, prefix, labels)
    hidden, _ = run_chatglm(model.text_encoder, embeds, mask)
    # hidden[t] predicts token t+1: run the vocabulary head only where there is a target. The
    # positions are found on the host (a boolean mask on the GPU would stall it to learn the size).
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    targets = model.upload(labels[:, 1:][rows, cols])
    logits = lm_logits(model.text_encoder, hidden[:, :-1][model.upload(rows), model.upload(cols)]).float()
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(-1) == targets).float().mean()
    return {"loss": loss, "token_acc": acc.detach()}


def img_token_hidden(model, captions: list[str]) -> torch.Tensor:
    """ChatGLM's final hidden states at the ``r`` ``[IMG]`` positions after each caption."""
    r = model.adapter.num_img
    seqs = [_prefix(model) + _caption_ids(model, c) + [SLOT] * r for c in captions]
    img = model.adapter.img_tokens[None].expand(len(captions), -1, -1)
    embeds, mask, _ = assemble_inputs(model, seqs, img)
    hidden, _ = run_chatglm(model.text_encoder, embeds, mask)
    return hidden[:, -r:]  # left padding: the [IMG] tokens are the last r positions


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, the local ones keeping their autograd path; returns (rows, offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    # The autograd-aware all_gather sends each rank's share of the gradient back to it, so the
    # loss is differentiated exactly through every rank's embeddings.
    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def retrieval(model, batch: dict) -> dict:
    adapter = model.adapter
    txt = adapter.text_proj(img_token_hidden(model, batch["captions"])).mean(dim=1)
    img = adapter.image_proj(model.vision_features(batch))
    txt, img = F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)
    all_txt, offset = gather_with_grad(txt)
    all_img, _ = gather_with_grad(img)
    scale = adapter.scale().float().squeeze()
    target = torch.arange(txt.shape[0], device=txt.device) + offset
    logits_i2t = scale * img @ all_txt.T
    logits_t2i = scale * txt @ all_img.T
    loss = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    acc = (logits_i2t.argmax(-1) == target).float().mean()
    return {"loss": loss, "i2t_acc": acc.detach(), "negatives": torch.tensor(all_txt.shape[0] - 1)}


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the target's mean square: scale-free. ChatGLM's hidden states are large, so a plain
    MSE swamped the diffusion loss and, through the global gradient clip, shrank the spatial
    adapter's updates (grounding benchmark, 600 steps: mIoU 0.35 with it vs 0.43 without a mapper loss)."""
    target = target.float()
    return F.mse_loss(pred.float(), target) / target.pow(2).mean().clamp(min=1e-12)


def generation(model, batch: dict) -> dict:
    captions = batch["captions"]
    b = len(captions)
    prompt_embeds, pooled = model.prompt_encoding(captions)

    # GILL mapper: regress ChatGLM's own encoding of the caption from the [IMG] hidden states.
    tokens, pooled_pred = model.adapter.mapper(img_token_hidden(model, captions))
    mapper_loss = relative_mse(tokens, prompt_embeds) + relative_mse(pooled_pred, pooled)

    # Diffusion through the frozen UNet, conditioned on the caption encoding (a dropped caption
    # becomes the encoding of "", Kolors' unconditional input) and on the layout.
    drop = model.rand(b) < model.caption_dropout  # applied unconditionally: `if drop.any()` stalls the GPU
    empty_embeds, empty_pooled = model.empty_prompt()
    prompt_embeds = torch.where(drop[:, None, None], empty_embeds, prompt_embeds)
    pooled = torch.where(drop[:, None], empty_pooled, pooled)
    latents = model.latents(batch)
    noise = model.randn(*latents.shape)
    steps = model.noise_scheduler.config.num_train_timesteps
    u = model.rand(b)
    if model.timestep_high_noise > 0:  # a config float: no GPU sync, and at 0 the random stream is unchanged
        # a share of the samples from the noisier half of the schedule, where layout is decided
        u = torch.where(model.rand(b) < model.timestep_high_noise, 0.5 + u / 2, u)
    t = (u * steps).long().clamp(max=steps - 1)
    noisy = model.noise_scheduler.add_noise(latents, noise, t)

    box_mask = model.upload(batch["box_mask"])
    box_mask = box_mask & ~(model.rand(b) < model.layout_dropout)[:, None]  # null layout for guidance
    phrases = model.phrases(model, batch["labels"], box_mask.shape[1])
    model.adapter.spatial.set_layout(phrases, model.upload(batch["boxes"]), box_mask, tuple(latents.shape[-2:]))
    pred = model.unet(
        noisy,
        t,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": model.time_ids(batch, latents.shape[-1] * model.vae_scale_factor)},
    ).sample
    diffusion_loss = F.mse_loss(pred.float(), noise.float())
    loss = model.mapper_loss_weight * mapper_loss + model.diffusion_loss_weight * diffusion_loss
    return {"loss": loss, "mapper_loss": mapper_loss.detach(), "diffusion_loss": diffusion_loss.detach()}
