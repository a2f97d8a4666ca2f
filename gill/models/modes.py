"""The three training modes (DESIGN §1): each maps ``(model, batch)`` to ``{"loss", ...metrics}``.

* ``captioning``  — image -> visual prefix -> frozen ChatGLM -> next-token CE on the caption;
* ``retrieval``   — caption + ``[IMG]`` -> ChatGLM -> text projection vs image projection,
  symmetric InfoNCE with negatives gathered from every rank;
* ``generation``  — GILL mapper regression to ChatGLM's caption encoding + the diffusion noise
  loss through the frozen UNet with the spatial adapter.

Retrieval and generation also carry GILL's next-token CE on "caption, then ``[IMG0]``" (weight
``model.adapter.lm_loss_weight``, GILL: 0.5), which teaches the LM to emit ``[IMG]`` by itself.

Each mode builds its own graph so the trainer can run forward -> backward -> free per mode.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gill.models.chatglm import embed_tokens, lm_logits, run_chatglm

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


def full_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's next-token logits over the frozen vocabulary and then ``[IMG0..r-1]``: ``[..., V + r]``.
    Token id ``V + i`` means ``[IMGi]`` (:func:`img_token_id`)."""
    return torch.cat((lm_logits(model.text_encoder, hidden), model.adapter.img_logits(hidden)), dim=-1)


def img_token_id(model, i: int = 0) -> int:
    """The id of ``[IMGi]`` in :func:`full_logits`' last axis (after the ``V`` vocabulary rows)."""
    return model.text_encoder.output_layer.out_features + i


def next_token_loss(model, hidden: torch.Tensor, labels: torch.Tensor):
    """Next-token CE where ``labels`` (host, ``[B, S]``) has a target: ``hidden[t]`` predicts
    ``labels[t + 1]``. Returns ``(loss, logits [N, V + r], targets [N])``.

    The logits are computed only at labelled positions: at Kolors scale a full ``[B, S, 65k]``
    would cost far more than the rest of the mode. The positions are found on the host (a boolean
    mask on the GPU would stall it to learn the size).
    """
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    targets = model.upload(labels[:, 1:][rows, cols])
    logits = full_logits(model, hidden[:, :-1][model.upload(rows), model.upload(cols)]).float()
    return F.cross_entropy(logits, targets), logits, targets


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
    # The softmax includes the [IMG] rows (as in GILL, whose vocabulary holds them), but no [IMG]
    # target: a caption of an image is text.
    loss, logits, targets = next_token_loss(model, hidden, labels)
    acc = (logits.argmax(-1) == targets).float().mean()
    return {"loss": loss, "token_acc": acc.detach()}


def img_token_forward(model, captions: list[str], lm_loss: bool = False):
    """Caption + ``[IMG0..r-1]`` through ChatGLM.

    Returns ``(hidden [B, r, H] at the [IMG] positions, lm)``. With ``lm_loss``, ``lm`` is GILL's
    next-token CE of this sequence: targets on the caption tokens and on ``[IMG0]`` after the
    caption; ``[IMG1..r-1]`` carry none (GILL masks them: at inference they are appended, not
    predicted). This is what teaches the LM to emit ``[IMG0]`` where a caption ends, and, through
    the [IMG] logits in every caption position's softmax, not before. ``lm`` is ``None`` otherwise.
    """
    return img_token_forward_ids(model, [_caption_ids(model, c) for c in captions], lm_loss)


def img_token_forward_ids(model, texts: list[list[int]], lm_loss: bool = False):
    """:func:`img_token_forward` on token ids (without the ``[gMASK] sop`` prefix, which is added)."""
    r = model.adapter.num_img
    seqs, labels = [], []
    for ids in texts:
        seqs.append(_prefix(model) + ids + [SLOT] * r)
        labels.append([IGNORE] * len(_prefix(model)) + ids + [img_token_id(model, 0)] + [IGNORE] * (r - 1))
    img = model.adapter.img_embeds()[None].expand(len(texts), -1, -1)
    embeds, mask, labels = assemble_inputs(model, seqs, img, labels if lm_loss else None)
    hidden, _ = run_chatglm(model.text_encoder, embeds, mask)
    lm = None
    if lm_loss:
        loss, logits, targets = next_token_loss(model, hidden, labels)
        first_img = targets == img_token_id(model, 0)
        # share of captions whose end predicts [IMG0] (argmax); one such target per caption, and no
        # boolean indexing (it would stall the GPU to learn the size)
        emitted = ((logits.argmax(-1) == targets) & first_img).float().sum() / len(texts)
        lm = {"lm_loss": loss, "img_emit_acc": emitted.detach()}
    return hidden[:, -r:], lm  # left padding: the [IMG] tokens are the last r positions


def img_token_hidden(model, captions: list[str]) -> torch.Tensor:
    """ChatGLM's final hidden states at the ``r`` ``[IMG]`` positions after each caption."""
    return img_token_forward(model, captions)[0]


def text_embedding(model, captions: list[str]) -> torch.Tensor:
    """``[B, d]`` retrieval embeddings of captions (unnormalised), as the retrieval mode computes them."""
    return model.adapter.text_embedding(img_token_hidden(model, captions))


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
    img_hidden, lm = img_token_forward(model, batch["captions"], lm_loss=True)
    txt = adapter.text_embedding(img_hidden)
    img = adapter.image_proj(model.vision_features(batch))
    txt, img = F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)
    all_txt, offset = gather_with_grad(txt)
    all_img, _ = gather_with_grad(img)
    scale = adapter.scale().float().squeeze()
    target = torch.arange(txt.shape[0], device=txt.device) + offset
    logits_i2t = scale * img @ all_txt.T
    logits_t2i = scale * txt @ all_img.T
    contrastive = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    acc = (logits_i2t.argmax(-1) == target).float().mean()
    loss = contrastive + model.lm_loss_weight * lm["lm_loss"]
    return {
        "loss": loss, "contrastive_loss": contrastive.detach(), "i2t_acc": acc.detach(),
        "negatives": torch.tensor(all_txt.shape[0] - 1), **_detached(lm),
    }


def _detached(metrics: dict) -> dict:
    return {k: v.detach() for k, v in metrics.items()}


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the target's mean square: scale-free. ChatGLM's hidden states are large, so a plain
    MSE swamped the diffusion loss and, through the global gradient clip, shrank the spatial
    adapter's updates (grounding benchmark, 600 steps: mIoU 0.35 with it vs 0.43 without a mapper loss)."""
    target = target.float()
    return F.mse_loss(pred.float(), target) / target.pow(2).mean().clamp(min=1e-12)


def generation(model, batch: dict) -> dict:
    captions = batch["captions"]
    b = len(captions)
    prompt_embeds, pooled = model.caption_encoding(batch)

    # GILL mapper: regress ChatGLM's own encoding of the caption from the [IMG] hidden states.
    img_hidden, lm = img_token_forward(model, captions, lm_loss=True)
    tokens, pooled_pred = model.adapter.map_to_conditioning(img_hidden)
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
    loss = (
        model.mapper_loss_weight * mapper_loss + model.diffusion_loss_weight * diffusion_loss
        + model.lm_loss_weight * lm["lm_loss"]
    )
    return {
        "loss": loss, "mapper_loss": mapper_loss.detach(), "diffusion_loss": diffusion_loss.detach(), **_detached(lm),
    }
