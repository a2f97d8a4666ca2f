"""Image transforms that move the layout boxes with the pixels (DESIGN §7).

Pure functions on ``(PIL image, list of normalized (x1, y1, x2, y2) boxes)`` plus
:class:`LayoutTransform`, which composes them the way SDXL/Kolors training scripts do
(resize shorter side -> optional flip -> square crop) and reports the crop's top-left corner
for the micro-conditioning time ids. All randomness comes from a ``numpy.random.Generator``
passed in by the caller, so an item's transform depends only on the caller's seed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]

# A box clipped by the crop to less than this many pixels on a side, or to less than this
# fraction of the crop's area, no longer shows its object: conditioning on it only teaches noise.
MIN_SIDE_PX = 2.0
MIN_AREA = 1e-4


def resize_shorter(image: Image.Image, boxes: Sequence[Box], size: int) -> tuple[Image.Image, list[Box]]:
    """Resize so the shorter side is ``size``, keeping the aspect ratio.

    Boxes are normalized, so an aspect-preserving resize leaves them unchanged.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return image, [tuple(b) for b in boxes]


def crop(
    image: Image.Image,
    boxes: Sequence[Box],
    top: int,
    left: int,
    h: int,
    w: int,
    min_side_px: float = MIN_SIDE_PX,
    min_area: float = MIN_AREA,
) -> tuple[Image.Image, list[Box], list[int]]:
    """Crop the ``h`` x ``w`` window at ``(top, left)``; re-normalize boxes to the window.

    Boxes cut by the window are clipped to it; boxes fully outside it, or clipped below
    ``min_side_px`` pixels on a side or ``min_area`` of the window, are dropped. Returns
    the cropped image, the surviving boxes and their indices in ``boxes`` (to keep labels aligned).
    """
    W, H = image.size
    out, kept = [], []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        # To the pixel frame of the source, shift to the window, clip, back to normalized.
        nx1 = min(max((x1 * W - left) / w, 0.0), 1.0)
        nx2 = min(max((x2 * W - left) / w, 0.0), 1.0)
        ny1 = min(max((y1 * H - top) / h, 0.0), 1.0)
        ny2 = min(max((y2 * H - top) / h, 0.0), 1.0)
        if (nx2 - nx1) * w < min_side_px or (ny2 - ny1) * h < min_side_px:
            continue
        if (nx2 - nx1) * (ny2 - ny1) < min_area:
            continue
        out.append((nx1, ny1, nx2, ny2))
        kept.append(i)
    return image.crop((left, top, left + w, top + h)), out, kept


def hflip(image: Image.Image, boxes: Sequence[Box]) -> tuple[Image.Image, list[Box]]:
    """Mirror left-right; x1 and x2 swap roles so boxes stay x1 < x2."""
    flipped = [(1.0 - x2, y1, 1.0 - x1, y2) for (x1, y1, x2, y2) in boxes]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped


class LayoutTransform:
    """Resize the shorter side to ``resolution``, flip with probability ``random_flip``,
    then crop a ``resolution`` square (centred or at a random offset).

    The order and the centre-crop rounding follow diffusers' ``train_text_to_image_sdxl.py``,
    so ``crop_top_left`` means what SDXL/Kolors were trained with: the crop's ``(top, left)``
    in the resized (and possibly flipped) image's pixel frame.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: float = 0.5,
                 min_side_px: float = MIN_SIDE_PX, min_area: float = MIN_AREA):
        if not 0.0 <= random_flip <= 1.0:
            raise ValueError(f"random_flip is a probability, got {random_flip}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = float(random_flip)
        self.min_side_px = min_side_px
        self.min_area = min_area

    def __call__(self, image: Image.Image, objects: Sequence[dict], rng: np.random.Generator
                 ) -> tuple[Image.Image, list[dict], tuple[int, int]]:
        """Return ``(image, objects, crop_top_left)``; ``objects`` are ``{"label", "bbox"}`` dicts."""
        res = self.resolution
        boxes = [tuple(o["bbox"]) for o in objects]
        image, boxes = resize_shorter(image, boxes, res)
        # Draw both random numbers unconditionally so the stream (and thus every later
        # draw) does not depend on the flip probability or the crop mode.
        flip_draw = rng.random()
        W, H = image.size
        off_top = int(rng.integers(0, H - res + 1))
        off_left = int(rng.integers(0, W - res + 1))
        if flip_draw < self.random_flip:
            image, boxes = hflip(image, boxes)
        if self.center_crop:
            top, left = int(round((H - res) / 2.0)), int(round((W - res) / 2.0))
        else:
            top, left = off_top, off_left
        image, boxes, kept = crop(image, boxes, top, left, res, res, self.min_side_px, self.min_area)
        out = [{**objects[i], "bbox": b} for i, b in zip(kept, boxes)]
        return image, out, (top, left)
