"""Synthetic layout data: coloured shapes on plain backgrounds with Chinese captions.

Needs no files and no downloads, so every mode trains and every test runs on a laptop.
Item ``i`` is a pure function of ``(seed, split, i)``; :func:`write_jsonl` materialises items
as PNGs plus a DESIGN §7 JSONL, to exercise the real :class:`~gill.data.layout.LayoutDataset`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gill.data.vocab import BACKGROUNDS, COLORS, SHAPES

# Separate random streams per split, so the validation set never repeats training items.
SPLITS = {"train": 0, "val": 1, "test": 2}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Fill ``shape`` so it spans its pixel box ``[x1, x2) x [y1, y2)``."""
    x1, y1, x2, y2 = box
    r, b = x2 - 1, y2 - 1  # PIL includes the end pixel; the box excludes it
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    if shape == "圆形":
        draw.ellipse((x1, y1, r, b), fill=fill)
    elif shape == "正方形":
        draw.rectangle((x1, y1, r, b), fill=fill)
    elif shape == "三角形":
        draw.polygon([(x1, b), (cx, y1), (r, b)], fill=fill)
    elif shape == "菱形":
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def reading_order(objects: list[dict]) -> list[dict]:
    """Objects left to right by box centre, then top to bottom: the order captions name them in.

    It is an order a vision model can read. Largest-first, the order before, made 13% of captions
    hinge on a 1 px difference between two objects' sides; box centres are that close in 4%.
    """
    return sorted(objects, key=lambda o: (o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3]))


def make_caption(background: str, labels: list[str]) -> str:
    """``白色背景上有一个红色圆形、一个绿色菱形和一个蓝色正方形``."""
    parts = [f"一个{label}" for label in labels]
    body = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
    return f"{background}背景上有{body}"


class SyntheticLayoutDataset:
    """``num_samples`` square images of ``min_objects``..``max_objects`` non-overlapping shapes.

    Every shape is drawn in a square pixel box of side ``min_size``..``max_size`` (fractions of
    the resolution) and fills it: the circle is inscribed, the square is the box. Items follow
    the dataset contract of ``gill/data`` (see ``collate.py``); objects are listed largest first
    (ties: left to right, then top to bottom), as :class:`~gill.data.layout.LayoutDataset` lists
    them, and the caption names them in :func:`reading_order`. Both are functions of the image.
    """

    def __init__(self, num_samples: int, resolution: int = 64, seed: int = 0, min_objects: int = 1,
                 max_objects: int = 3, split: str = "train", min_size: float = 0.2, max_size: float = 0.45):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 0 < min_size <= max_size <= 1:
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
        self.num_samples = num_samples
        self.resolution = resolution
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.split = split
        self.min_size = min_size
        self.max_size = max_size

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Items do not change with the epoch; present so trainers treat all datasets alike."""

    def _layout(self, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
        res = self.resolution
        lo = max(2, int(round(self.min_size * res)))
        hi = max(lo, int(round(self.max_size * res)))
        want = int(rng.integers(self.min_objects, self.max_objects + 1))
        boxes: list[tuple[int, int, int, int]] = []
        # Rejection sampling; a crowded draw just ends up with fewer objects (at least one).
        for _ in range(50 * want):
            if len(boxes) == want:
                break
            s = int(rng.integers(lo, hi + 1))
            x, y = int(rng.integers(0, res - s + 1)), int(rng.integers(0, res - s + 1))
            box = (x, y, x + s, y + s)
            if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in boxes):
                boxes.append(box)
        return boxes

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, SPLITS[self.split], index))
        res = self.resolution
        bg_names, color_names = list(BACKGROUNDS), list(COLORS)
        background = bg_names[int(rng.integers(len(bg_names)))]
        image = Image.new("RGB", (res, res), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        # Largest first; equal sizes left to right, then top to bottom, so the object order (and with it
        # the caption) is a function of the image alone, never of the sampling order.
        boxes = sorted(self._layout(rng), key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[0], b[1]))
        objects = []
        for box in boxes:
            color = color_names[int(rng.integers(len(color_names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            _draw_shape(draw, shape, box, COLORS[color])
            objects.append({"label": color + shape, "bbox": tuple(v / res for v in box)})
        return {
            "id": f"synthetic_{self.split}_{index:08d}",
            "image": image,
            "caption": make_caption(background, [o["label"] for o in reading_order(objects)]),
            "objects": objects,
            "original_size": (res, res),
            "crop_top_left": (0, 0),
        }


def write_jsonl(dataset, out_dir: str | Path, num: int | None = None, filename: str = "layout.jsonl",
                image_dir: str = "images") -> Path:
    """Write the first ``num`` items (default: all) as ``out_dir/images/<id>.png`` plus a
    DESIGN §7 JSONL ``out_dir/<filename>`` whose image paths are relative to ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / image_dir).mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(dataset) if num is None else num):
            item = dataset[i]
            rel = f"{image_dir}/{item['id']}.png"
            item["image"].save(out_dir / rel)
            record = {
                "id": item["id"], "image": rel, "caption": item["caption"],
                "width": item["image"].width, "height": item["image"].height,
                "objects": [{"label": o["label"], "bbox": list(o["bbox"])} for o in item["objects"]],
                "annotator": {"model": "synthetic", "prompt": None},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
