"""Validation metrics (rank 0, forward only): retrieval recall@1/5 both ways, captioning token
accuracy and greedy captions, generation losses.

The model's random stream is saved and restored around the pass, so validating changes nothing
about the training that follows (resume stays exact).
"""
from __future__ import annotations

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
