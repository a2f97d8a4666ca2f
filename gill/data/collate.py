"""Batching of layout items and the dataset factory used by the trainer.

Every dataset in ``gill/data`` returns items of this shape (the model side relies on it)::

    {"id": str, "image": PIL RGB (resolution x resolution), "caption": str,
     "objects": [{"label": str, "bbox": (x1, y1, x2, y2)}],   # normalized, largest first
     "original_size": (h, w), "crop_top_left": (top, left)}

:func:`collate_layout` keeps images as PIL (the model's own processors make tensors) and pads
boxes to the largest object count in the batch. Items of the encoder cache
(:class:`gill.data.encoder_cache.CachedLayoutDataset`) carry ``latent_mean``, ``latent_std`` and
``vision_features`` tensors instead of ``image`` (and ``prompt_embeds`` / ``prompt_pooled`` with ``cache.prompts``);
those are stacked.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gill.data.layout import LayoutDataset
from gill.data.synthetic import SyntheticLayoutDataset


def collate_layout(items: list[dict]) -> dict:
    """Batch items: ``boxes`` [B, N, 4] float zero-padded with ``box_mask`` [B, N] bool,
    N = most objects of any item (at least 1, so an all-empty batch still has a box axis)."""
    n = max([1] + [len(it["objects"]) for it in items])
    boxes = torch.zeros(len(items), n, 4, dtype=torch.float32)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        for j, obj in enumerate(it["objects"]):
            boxes[b, j] = torch.tensor(obj["bbox"], dtype=torch.float32)
            mask[b, j] = True
    cached = ["latent_mean" in it for it in items]
    if any(cached) and not all(cached):
        raise ValueError("a batch mixes cached items (encoder outputs) and image items")
    out = {"ids": [it["id"] for it in items]}
    if all(cached):
        for key, value in items[0].items():  # the cache's tensors, whichever it holds
            if isinstance(value, torch.Tensor):
                out[key] = torch.stack([it[key] for it in items])
    else:
        out["images"] = [it["image"] for it in items]
    return out | {
        "captions": [it["caption"] for it in items],
        "labels": [[o["label"] for o in it["objects"]] for it in items],
        "boxes": boxes,
        "box_mask": mask,
        "original_size": torch.tensor([list(it["original_size"]) for it in items], dtype=torch.long),
        "crop_top_left": torch.tensor([list(it["crop_top_left"]) for it in items], dtype=torch.long),
    }


def build_dataset(data_cfg, resolution: int, seed: int):
    """Dataset for a ``data`` config group (a dict or an OmegaConf node).

    ``name: synthetic`` (``num_samples``, ``seed``, ``min_objects``, ``max_objects``, ``split``)
    or ``name: layout`` (``path``, ``image_root`` — default: the JSONL's folder —, ``center_crop``,
    ``random_flip``, ``max_objects``, ``bbox_unit``, ``split``, ``val_fraction``). ``seed`` is the
    training seed; a synthetic config's own ``seed`` (which fixes *what* the data is) takes precedence.

    Held-out validation for a layout file: the training config's ``val`` reads the same ``path`` with
    ``split: val``, and the training set leaves those records out (``split: train``). A ``val`` that
    points at another file reads all of it, and the training set keeps every record.
    """
    name = data_cfg.get("name")
    if name == "synthetic":
        return SyntheticLayoutDataset(
            num_samples=int(data_cfg.get("num_samples", 1000)),
            resolution=resolution,
            seed=int(data_cfg.get("seed") if data_cfg.get("seed") is not None else seed),
            min_objects=int(data_cfg.get("min_objects", 1)),
            max_objects=int(data_cfg.get("max_objects", 3)),
            split=data_cfg.get("split", "train"),
        )
    if name == "layout":
        path = data_cfg.get("path")
        if not path:
            raise ValueError("data.path must point at a layout JSONL (DESIGN §7)")
        image_root = data_cfg.get("image_root") or Path(path).parent
        split, fraction = _layout_split(data_cfg, path)
        return LayoutDataset(
            path, image_root, resolution,
            center_crop=bool(data_cfg.get("center_crop", True)),
            random_flip=float(data_cfg.get("random_flip", 0.5)),
            seed=seed,
            max_objects=int(data_cfg.get("max_objects", 30)),
            bbox_unit=data_cfg.get("bbox_unit", "norm"),
            split=split, val_fraction=fraction,
        )
    raise ValueError(f"unknown data.name {name!r}; expected 'synthetic' or 'layout'")


def _same_file(a, b) -> bool:
    return bool(a) and bool(b) and Path(str(a)).resolve() == Path(str(b)).resolve()


def _layout_split(data_cfg, path) -> tuple[str, float]:
    """``(split, val_fraction)`` of a layout config: a split only when validation comes from the same file."""
    fraction = float(data_cfg.get("val_fraction") or 0.0)
    split = data_cfg.get("split") or "all"
    if fraction <= 0.0 or split == "all":
        return "all", 0.0
    if split == "val":
        source = data_cfg.get("holdout_of") or path
        return ("val", fraction) if _same_file(source, path) else ("all", 0.0)
    val = data_cfg.get("val")
    if val and val.get("name") == "layout" and _same_file(val.get("path"), path):
        return "train", fraction
    return "all", 0.0
