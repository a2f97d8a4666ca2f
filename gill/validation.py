"""Validation (rank 0, forward only): retrieval recall@1/5 both ways, captioning token accuracy and
greedy captions, generation losses, and layout images rendered by the inference path, boxes drawn.

The model's random stream is saved and restored around the pass, so validating changes nothing
about the training that follows (resume stays exact).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gill import modes


def recall_at_k(sim: torch.Tensor, k: int) -> float:
    """``sim[i, j]``: query i vs candidate j; the right candidate of query i is j = i."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return (top == torch.arange(sim.shape[0], device=sim.device)[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def embed_pairs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized (text, image) retrieval embeddings of a batch."""
    txt = model.adapter.text_proj(modes.img_token_hidden(model, batch["captions"])).mean(dim=1)
    img = model.adapter.image_proj(model.vision_features(batch))
    return F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)


@torch.no_grad()
def evaluate(model, loader, train_cfg) -> tuple[dict, list[tuple[str, str]]]:
    was_training = model.training
    model.eval()
    rng_state = model.rng.get_state()
    # Validation runs on images: if the encoder cache parked the VAE / CLIP tower on the CPU for
    # training, they come back to the device for this pass.
    with model.frozen_encoders_on_device():
        try:
            txts, imgs, sums, n = [], [], {}, 0
            captions: list[tuple[str, str]] = []
            for i, batch in enumerate(loader):
                if i >= int(train_cfg.val_batches):
                    break
                t, im = embed_pairs(model, batch)
                txts.append(t)
                imgs.append(im)
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
            if txts:
                sim = torch.cat(txts) @ torch.cat(imgs).T  # [texts, images]
                metrics.update({
                    "retrieval/t2i_recall@1": recall_at_k(sim, 1),
                    "retrieval/t2i_recall@5": recall_at_k(sim, 5),
                    "retrieval/i2t_recall@1": recall_at_k(sim.T, 1),
                    "retrieval/i2t_recall@5": recall_at_k(sim.T, 5),
                })
            return metrics, captions
        finally:
            model.rng.set_state(rng_state)
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
