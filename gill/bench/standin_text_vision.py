"""The stand-in's tiny ChatGLM and CLIP vision tower, pretrained together on the synthetic
captions and images (causal LM, image-conditioned LM through a soft prefix, contrastive,
attribute read-outs), as the real ones are pretrained; cached on their own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gill.bench.grounding_presets import Preset, REPO, STANDIN_VERSION, _TV_SUBDIRS, text_vision_key
from gill.bench.standin import _images_tensor, _warmup_cosine, colour_separation

log = logging.getLogger("gill.bench.grounding")


def text_encoder_checks(stack_dir: Path, device) -> dict:
    """:func:`colour_separation` of the stand-in's text encoder (loaded from its directory, as training
    loads it) and, for comparison, of the tiny stack's random one."""
    from gill.models.stack import ensure_tiny_stack, load_stack

    out = {}
    for name, path in (("standin", stack_dir), ("random", ensure_tiny_stack())):
        stack = load_stack({"name": "tiny", "pretrained_path": str(path), "dtype": "fp32"}, device=device)
        out[name] = colour_separation(stack)
    return out


def attach_vision_tower(stack, p: Preset, device, seed: int) -> None:
    """Give ``stack`` a fresh :func:`standin_vision_config` CLIP tower and a preprocessor at its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 3)
    cfg = standin_vision_config(p)
    stack.vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).to(device)
    size = cfg["image_size"]
    old = stack.image_processor
    stack.image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                               image_mean=old.image_mean, image_std=old.image_std)


def pretrain_text_vision_split(stack, p: Preset, gen, seed: int) -> dict:
    """:func:`pretrain_text_vision` on fresh train-split items, evaluated on 128 ``val`` images."""
    from gill.data.synthetic import SyntheticLayoutDataset

    val = SyntheticLayoutDataset(128, p.resolution, seed=seed, split="val")
    train = SyntheticLayoutDataset(p.tv_steps * p.tv_batch, p.resolution, seed=seed + 1, split="train")
    return pretrain_text_vision(stack, train, p, gen, [val[i] for i in range(len(val))])


def build_text_vision(stack, out: Path, p: Preset, gen, device, seed: int) -> dict:
    """Replace the stand-in's random ChatGLM and CLIP tower by pretrained ones (see
    :func:`pretrain_text_vision`) and save them into ``out`` in the real layout, loadable by
    ``from_pretrained``."""
    attach_vision_tower(stack, p, device, seed)
    stats = pretrain_text_vision_split(stack, p, gen, seed)
    for sub in _TV_SUBDIRS:
        shutil.rmtree(out / sub)
    stack.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    stack.vision.save_pretrained(out / "image_encoder", safe_serialization=True)
    stack.image_processor.save_pretrained(out / "image_encoder")
    return stats


def text_vision_cache(work_dir: Path, p: Preset, seed: int) -> Path:
    """Where :func:`build_text_vision`'s result is cached on its own (the slowest stage after the UNet):
    the saved folders, the stats and the generator's state afterwards, so that a stand-in built from
    the cache continues the same random stream and equals one built from scratch."""
    return work_dir / f"textvision-{STANDIN_VERSION}-{text_vision_key(p)}-seed{seed}"


def save_text_vision_cache(cache: Path, stack_dir: Path, stats: dict, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    tmp = cache.parent / (cache.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in _TV_SUBDIRS:
        shutil.copytree(stack_dir / sub, tmp / sub)
    save_file({"state": gen.get_state()}, str(tmp / "generator.safetensors"))
    (tmp / "TV.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def probe_text_vision(p: Preset, device, seed: int = 0) -> dict:
    """Only stage (a0), nothing saved: pretrain the text encoder and tower of this preset and report
    their held-out numbers (``--only text-vision``, for tuning the tower without building a UNet)."""
    from gill.models.stack import ensure_tiny_stack, load_stack

    stack = load_stack({"name": "tiny", "pretrained_path": ensure_tiny_stack(), "dtype": "fp32"}, device=device)
    attach_vision_tower(stack, p, device, seed)
    stats = pretrain_text_vision_split(stack, p, torch.Generator().manual_seed(seed), seed)
    stats["vision_params"] = sum(q.numel() for q in stack.vision.parameters())
    return {"preset": dataclasses.asdict(p), "text_vision": stats, "device": str(device)}


def _tiny_model_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")


# =============================================================================================
# (a0) the stand-in's text encoder and vision tower: pretrained, then frozen like ChatGLM3 / CLIP
# =============================================================================================
# The stand-in's CLIP vision tower. The tiny stack's (32 px input, width 32, 2 layers) cannot resolve
# three 6-14 px shapes after its 2x downsampling; the stand-in sees the images at their 64 px.
def standin_vision_config(p: Preset) -> dict:
    """``CLIPVisionConfig`` kwargs of the stand-in tower: the preset's width, depth and patch, 16-wide
    heads, a 2x MLP, the projection as wide as the tower, input at the images' own resolution."""
    w = p.vision_width
    return dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=p.vision_layers,
                num_attention_heads=max(1, w // 16), image_size=p.resolution, patch_size=p.vision_patch,
                projection_dim=w)


MAX_SLOTS = 3  # the synthetic data's most objects per image


def attribute_targets(item: dict) -> list[int]:
    """``[bg, colour_1, shape_1, ..., colour_3, shape_3]`` class ids in caption order (none = last id)."""
    from gill.data.synthetic import reading_order
    from gill.data.vocab import BACKGROUNDS, COLORS, SHAPES

    bg = item["caption"].split("背景")[0]
    out = [list(BACKGROUNDS).index(bg)]
    objects = reading_order(item["objects"])
    for j in range(MAX_SLOTS):
        if j < len(objects):
            lab = objects[j]["label"]
            out += [list(COLORS).index(lab[:2]), SHAPES.index(lab[2:])]
        else:
            out += [len(COLORS), len(SHAPES)]
    return out


def _attr_sizes() -> list[int]:
    from gill.data.vocab import BACKGROUNDS, COLORS, SHAPES

    return [len(BACKGROUNDS)] + [len(COLORS) + 1, len(SHAPES) + 1] * MAX_SLOTS


def _attr_loss(logits: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE over the attribute groups; also the fraction of rows with every group right."""
    loss, right, s = 0.0, torch.ones(len(targets), dtype=torch.bool, device=targets.device), 0
    for g, n in enumerate(sizes):
        lg = logits[:, s : s + n]
        loss = loss + F.cross_entropy(lg, targets[:, g])
        right &= lg.argmax(-1) == targets[:, g]
        s += n
    return loss, right.float().mean()


def _lm_batch(tokenizer, prefix_len: int, texts_ids: list[list[int]], device):
    """Left-padded ``[gMASK] sop`` + ``prefix_len`` slots + text + eos: ids (slots = 0), mask, labels,
    slot positions."""
    head = tokenizer.get_prefix_tokens()
    eos = tokenizer.eos_token_id
    seqs = [head + [-1] * prefix_len + t + [eos] for t in texts_ids]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, t) in enumerate(zip(seqs, texts_ids)):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
        labels[i, width - len(t) - 1:] = torch.tensor(t + [eos])
    slots = ids == -1
    return ids.clamp(min=0).to(device), mask.to(device), labels.to(device), slots.to(device)


def _run_lm(text_encoder, ids, mask, slots=None, slot_embeds=None):
    """(LM loss terms need) last hidden [B, S, H] and the pre-norm final hidden [B, S, H]."""
    from gill.models.chatglm import embed_tokens, run_chatglm

    emb = embed_tokens(text_encoder, ids)
    if slot_embeds is not None:
        emb = emb.masked_scatter(slots[..., None], slot_embeds.to(emb.dtype))
    last, hs = run_chatglm(text_encoder, emb, mask, output_hidden_states=True)
    return last, hs[-1].transpose(0, 1)


def _lm_loss(text_encoder, last, labels):
    from gill.models.chatglm import lm_logits

    tgt = labels[:, 1:]
    keep = tgt != -100
    logits = lm_logits(text_encoder, last[:, :-1][keep]).float()
    return F.cross_entropy(logits, tgt[keep]), (logits.argmax(-1) == tgt[keep]).float().mean()


def _fast_pixel_values(stack, items) -> torch.Tensor:
    """What the stand-in's CLIPImageProcessor gives for images already at its input size (its resize
    and crop are the identity there): rescale to [0, 1] and normalize, without PIL round trips."""
    x = _images_tensor(items, "cpu").add(1.0).div(2.0)
    mean = torch.tensor(stack.image_processor.image_mean)[:, None, None]
    std = torch.tensor(stack.image_processor.image_std)[:, None, None]
    return (x - mean) / std


def _pixel_values(stack, items, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(items), batch):
        out.append(stack.image_processor(images=[it["image"].convert("RGB") for it in items[s : s + batch]],
                                         return_tensors="pt")["pixel_values"])
    return torch.cat(out)


class _PretrainHeads(torch.nn.Module):
    """Pretraining-only modules, discarded afterwards: a visual prefix for image-conditioned LM, the
    contrastive text projection and temperature, and attribute read-outs."""

    def __init__(self, llm_dim: int, vision_dim: int, k: int, n_attr: int, n_phrase: int):
        super().__init__()
        self.k = k
        self.prefix = torch.nn.Linear(vision_dim, k * llm_dim)
        self.text_proj = torch.nn.Linear(llm_dim, vision_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.img_attr = torch.nn.Linear(vision_dim, n_attr)
        self.txt_attr = torch.nn.Linear(llm_dim, n_attr)
        self.phrase_attr = torch.nn.Linear(llm_dim, n_phrase)


def pretrain_text_vision(stack, data, p: "Preset", gen: torch.Generator, eval_items: list[dict] | None = None) -> dict:
    """Make the stand-in's ChatGLM a language model of the caption language and its CLIP tower an
    image encoder whose features say what is in the image: the roles ChatGLM3 and CLIP play, frozen,
    in the real stack. One loop, AdamW on both, with losses (heads discarded afterwards):

    * causal LM on captions and on object labels (phrases) — ChatGLM as a language model;
    * image-conditioned LM: CLIP embedding -> ``k`` soft prefix tokens -> the caption, so the LM reads a
      soft prompt (as ChatGLM3 reads instructions) and CLIP's embedding carries the whole caption;
    * CLIP-style symmetric InfoNCE between the CLIP embedding and ChatGLM's pooled caption vector;
    * linear attribute read-outs (background; colour and shape per caption slot; colour and shape of a
      phrase) from CLIP's embedding, the pooled caption vector and the pooled phrase vector.

    ``data``: a synthetic train-split dataset of at least ``tv_steps * tv_batch`` items; every step
    renders fresh ones (a small ViT overfits a fixed pool of a few thousand images).
    """
    from gill.data.vocab import COLORS, SHAPES

    te, vis, tok = stack.text_encoder, stack.vision, stack.tokenizer
    dev = next(te.parameters()).device
    k = int(_tiny_model_cfg().adapter.prefix_tokens)
    sizes = _attr_sizes()
    heads = _PretrainHeads(te.config.hidden_size, vis.config.projection_dim, k, sum(sizes),
                           len(COLORS) + len(SHAPES)).to(dev)
    te.train().requires_grad_(True)
    vis.train().requires_grad_(True)
    params = [*te.parameters(), *vis.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=p.tv_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(p.tv_steps, warmup=min(100, p.tv_steps // 10)))
    probe = [data[i] for i in range(8)]
    if not torch.allclose(_fast_pixel_values(stack, probe), _pixel_values(stack, probe), atol=1e-4):
        raise RuntimeError("the fast pixel path differs from the CLIPImageProcessor's")
    labels = sorted(f"{c}{s}" for c in COLORS for s in SHAPES)
    lab_ids = [tok.encode(l, add_special_tokens=False) for l in labels]
    lab_tgt = torch.tensor([[list(COLORS).index(l[:2]), SHAPES.index(l[2:])] for l in labels], device=dev)
    t0, hist = time.perf_counter(), []
    for step in range(p.tv_steps):
        batch = [data[i] for i in range(step * p.tv_batch, (step + 1) * p.tv_batch)]
        idx = list(range(len(batch)))
        cap_ids = [tok.encode(it["caption"], add_special_tokens=False) for it in batch]
        attrs = torch.tensor([attribute_targets(it) for it in batch], device=dev)
        img = vis(pixel_values=_fast_pixel_values(stack, batch).to(dev)).image_embeds  # [B, Dv]
        # image-conditioned LM
        ids, mask, lab, slots = _lm_batch(tok, k, [cap_ids[i] for i in idx], dev)
        last, _ = _run_lm(te, ids, mask, slots, heads.prefix(img).view(len(idx), k, -1))
        cond_lm, cond_acc = _lm_loss(te, last, lab)
        # plain LM on the captions; pooled = pre-norm final hidden at the last caption token (before eos)
        ids, mask, lab, _ = _lm_batch(tok, 0, [cap_ids[i] for i in idx], dev)
        last, pre = _run_lm(te, ids, mask)
        lm, _ = _lm_loss(te, last, lab)
        pooled = pre[:, -2]
        # phrases
        pj = torch.randint(0, len(labels), (min(p.tv_batch, len(labels)),), generator=gen).tolist()
        ids, mask, lab, _ = _lm_batch(tok, 0, [lab_ids[j] for j in pj], dev)
        last, pre = _run_lm(te, ids, mask)
        plm, _ = _lm_loss(te, last, lab)
        ph_loss, ph_acc = _attr_loss(heads.phrase_attr(pre[:, -2]), lab_tgt[pj], [len(COLORS), len(SHAPES)])
        # contrastive + attribute read-outs
        ti = F.normalize(heads.text_proj(pooled), dim=-1)
        ii = F.normalize(img, dim=-1)
        logits = heads.logit_scale.clamp(max=math.log(100.0)).exp() * ii @ ti.T
        tgt = torch.arange(len(idx), device=dev)
        clip = (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt)) / 2
        ia_loss, ia_acc = _attr_loss(heads.img_attr(img), attrs[idx], sizes)
        ta_loss, ta_acc = _attr_loss(heads.txt_attr(pooled), attrs[idx], sizes)
        loss = cond_lm + lm + 0.5 * plm + clip + p.tv_attr_weight * (ia_loss + ta_loss + ph_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append([cond_lm.item(), lm.item(), clip.item(), ia_acc.item(), ta_acc.item(), ph_acc.item(),
                     cond_acc.item()])
        if (step + 1) % max(1, p.tv_steps // 10) == 0:
            m = np.mean(hist[-50:], axis=0)
            log.info("text/vision step %d/%d  cond-LM %.3f (tok acc %.3f)  LM %.3f  clip %.3f  attr acc img %.2f txt %.2f "
                     "phrase %.2f", step + 1, p.tv_steps, m[0], m[6], m[1], m[2], m[3], m[4], m[5])
    te.eval().requires_grad_(False)
    vis.eval().requires_grad_(False)
    m = np.mean(hist[-50:], axis=0)
    out = {"tv_s": time.perf_counter() - t0, "tv_cond_lm": float(m[0]), "tv_lm": float(m[1]), "tv_clip": float(m[2]),
           "tv_img_attr_acc": float(m[3]), "tv_txt_attr_acc": float(m[4]), "tv_phrase_acc": float(m[5])}
    if eval_items:
        out.update(_pretrain_eval(stack, heads, eval_items, k))
    return out


@torch.no_grad()
def _pretrain_eval(stack, heads, items, k: int) -> dict:
    """Held-out: greedy captions through the pretraining prefix (exact match), contrastive recall@1."""
    from gill.models.chatglm import lm_logits
    from gill.inference.captioning import allowed_token_mask
    from gill.training.validation import recall_at_k

    te, vis, tok = stack.text_encoder, stack.vision, stack.tokenizer
    dev = next(te.parameters()).device
    # the captioning path's own restriction (no specials, no padded vocabulary rows): an early model emits them
    allowed = allowed_token_mask(te, tok)
    img = vis(pixel_values=_pixel_values(stack, items).to(dev)).image_embeds
    cap_ids = [tok.encode(it["caption"], add_special_tokens=False) for it in items]
    ids, mask, lab, _ = _lm_batch(tok, 0, cap_ids, dev)
    _, pre = _run_lm(te, ids, mask)
    ti = F.normalize(heads.text_proj(pre[:, -2]), dim=-1)
    sim = ti @ F.normalize(img, dim=-1).T
    prefix = heads.prefix(img).view(len(items), k, -1)
    rows = [[] for _ in items]
    eos = tok.eos_token_id
    for _ in range(32):
        ids, mask, _, slots = _lm_batch(tok, k, rows, dev)
        ids, mask, slots = ids[:, :-1], mask[:, :-1], slots[:, :-1]  # drop the eos _lm_batch appends
        last, _ = _run_lm(te, ids, mask, slots, prefix)
        nxt = lm_logits(te, last[:, -1]).masked_fill(~allowed, float("-inf")).argmax(-1).tolist()
        for r, t in zip(rows, nxt):
            r.append(t)
        if all(eos in r for r in rows):
            break
    hyps = [tok.decode(r[: r.index(eos)] if eos in r else r) for r in rows]
    exact = float(np.mean([h == it["caption"] for h, it in zip(hyps, items)]))
    return {"tv_eval_caption_exact": exact, "tv_eval_t2i_recall@1": recall_at_k(sim, 1),
            "tv_eval_i2t_recall@1": recall_at_k(sim.T, 1), "tv_eval_examples": list(zip([it["caption"] for it in items[:3]], hyps[:3]))}
