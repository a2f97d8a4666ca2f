"""Validation (rank 0, forward only): retrieval recall@1/5 both ways, captioning token accuracy and
greedy captions, generation losses, and layout images rendered by the inference path, boxes drawn.

Numbers that can move: recall ranks a fixed held-out set of ``train.val_recall_pairs`` (64) pairs,
so recall@5 is not 1.0 by construction; the losses are computed with the caption/layout dropouts
off and with timesteps and noise from a generator seeded afresh for every pass, so two passes over
the same weights give the same numbers and a curve shows the weights, not the draws. The training
random stream is left untouched (resume stays exact).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from gill.models import modes

log = logging.getLogger(__name__)
VAL_SEED = 1234  # the validation pass's own random stream: the same timesteps and noise every pass


def recall_at_k(sim: torch.Tensor, k: int) -> float:
    """``sim[i, j]``: query i vs candidate j; the right candidate of query i is j = i."""
    if k > sim.shape[1]:
        log.warning("recall@%d over %d candidates: k clamped to %d (the metric is 1.0 by construction)",
                    k, sim.shape[1], sim.shape[1])
        k = sim.shape[1]
    top = sim.topk(k, dim=1).indices
    return (top == torch.arange(sim.shape[0], device=sim.device)[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def embed_pairs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized (text, image) retrieval embeddings of a batch."""
    txt = modes.text_embedding(model, batch["captions"])  # as the retrieval mode embeds a caption
    img = model.adapter.image_proj(model.vision_features(batch))
    return F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)


@contextlib.contextmanager
def held_still(model, seed: int = VAL_SEED):
    """Dropouts off and a freshly seeded random stream for the pass (the training one is set aside)."""
    saved = model.caption_dropout, model.layout_dropout, model.rng
    model.caption_dropout = model.layout_dropout = 0.0
    model.rng = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        model.caption_dropout, model.layout_dropout, model.rng = saved


@torch.no_grad()
def retrieval_recall(model, loader, pairs: int) -> dict:
    """Recall@1/5 both ways over the first ``pairs`` pairs of ``loader`` (fewer, with a warning, if it has fewer)."""
    txts, imgs, n = [], [], 0
    for batch in loader:
        t, im = embed_pairs(model, batch)
        txts.append(t)
        imgs.append(im)
        n += t.shape[0]
        if n >= pairs:
            break
    if n < pairs:
        log.warning("validation recall over %d pairs only (train.val_recall_pairs=%d): the validation set is smaller",
                    n, pairs)
    if not txts:
        return {}
    sim = torch.cat(txts)[:pairs] @ torch.cat(imgs)[:pairs].T  # [texts, images]
    return {
        "retrieval/pairs": float(sim.shape[0]),
        "retrieval/t2i_recall@1": recall_at_k(sim, 1),
        "retrieval/t2i_recall@5": recall_at_k(sim, 5),
        "retrieval/i2t_recall@1": recall_at_k(sim.T, 1),
        "retrieval/i2t_recall@5": recall_at_k(sim.T, 5),
    }


@torch.no_grad()
def evaluate(model, loader, train_cfg) -> tuple[dict, list[tuple[str, str]]]:
    was_training = model.training
    model.eval()
    # Validation runs on images: if the encoder cache parked the VAE / CLIP tower on the CPU for
    # training, they come back to the device for this pass.
    with model.frozen_encoders_on_device(), held_still(model):
        try:
            sums, n = {}, 0
            captions: list[tuple[str, str]] = []
            for i, batch in enumerate(loader):
                if i >= int(train_cfg.val_batches):
                    break
                for mode in ("captioning", "generation"):
                    for k, v in getattr(modes, mode)(model, batch).items():
                        if k in ("loss", "token_acc", "mapper_loss", "diffusion_loss"):
                            key = f"{mode}/{k}"
                            sums[key] = sums.get(key, 0.0) + float(v)
                n += 1
                if len(captions) < int(train_cfg.val_captions):
                    from gill.inference.captioning import caption

                    take = int(train_cfg.val_captions) - len(captions)
                    outs = caption(model, batch["images"][:take])
                    captions += list(zip(batch["captions"][:take], outs))
            metrics = {k: v / max(n, 1) for k, v in sums.items()}
            metrics.update(retrieval_recall(model, loader, int(train_cfg.get("val_recall_pairs", 64))))
            return metrics, captions
        finally:
            model.train(was_training)


def validation_size(model, i: int) -> tuple[int, int]:
    """``(height, width)`` of validation image ``i``: the native square, except every second image,
    which is 3:4 landscape (a multiple of 8 px, as the pipeline requires) so non-square generation is
    exercised throughout training."""
    from gill.inference.layout_pipeline import default_size

    h, w = default_size(model)
    return (h * 3 // 4 // 8 * 8, w) if i % 2 else (h, w)


def render_validation_images(model, batch: dict, out_dir, step: int, *, max_images: int = 4, steps: int = 20,
                             guidance_scale: float = 3.0, beta: float = 1.0, seed: int = 0) -> list[Path]:
    """Generate the first ``max_images`` layouts of a collated batch with the inference path
    (``generate_layout``), adapter on, at :func:`validation_size`, and save each with its requested
    boxes drawn on top as ``<out_dir>/step_<step>/<i>_<id>.png``. Returns the paths. Restores the
    model's train/eval mode and leaves its random stream untouched (generation uses its own seeded
    generators)."""
    from gill.inference import draw_layout, generate_layout

    was_training = model.training
    model.eval()
    folder = Path(out_dir) / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with model.frozen_encoders_on_device():  # the VAE decodes, even if the cache parked it
        try:
            for i in range(min(max_images, len(batch["captions"]))):
                n = int(batch["box_mask"][i].sum())
                objects = [(batch["labels"][i][j], batch["boxes"][i, j].tolist()) for j in range(n)]
                height, width = validation_size(model, i)
                image = generate_layout(model, batch["captions"][i], objects, steps=steps, guidance_scale=guidance_scale,
                                        beta=beta, seed=seed + i, height=height, width=width)[0]
                scale = max(1, 256 // image.width)  # small images are enlarged so the labels stay legible
                path = folder / f"{i:02d}_{batch['ids'][i] if 'ids' in batch else i}.png"
                draw_layout(image.resize((image.width * scale, image.height * scale)), objects).save(path)
                paths.append(path)
        finally:
            model.train(was_training)
        return paths
