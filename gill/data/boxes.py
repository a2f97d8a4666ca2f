"""Bounding boxes: conversion of every supported unit to normalized ``(x1, y1, x2, y2)``.

This is the single boundary where boxes enter the project (DESIGN §7): the annotator, the
JSONL loader and inference all call :func:`normalize_bbox`; the model only sees normalized boxes.
"""
from __future__ import annotations

import math
from typing import Sequence

UNITS = ("norm", "1000", "pixel", "xywh_pixel")

# Boxes may overshoot the frame by this much (VLMs write 1000 for "the edge", rounding puts
# pixel boxes one past the border); within it they are clipped, beyond it they are rejected.
TOLERANCE = 0.02


def normalize_bbox(
    box: Sequence[float],
    unit: str,
    width: float | None = None,
    height: float | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[float, float, float, float]:
    """Return ``box`` as normalized ``(x1, y1, x2, y2)`` floats in [0, 1].

    ``unit``: ``"norm"`` (already 0–1), ``"1000"`` (0–1000 integers, Qwen2-VL / Qwen3-VL),
    ``"pixel"`` (absolute ``x1, y1, x2, y2``) or ``"xywh_pixel"`` (absolute ``x, y, w, h``);
    the pixel units need ``width`` and ``height`` of the frame the numbers refer to.

    Raises ``ValueError`` naming the problem for a wrong length, NaN/inf, inverted or zero-area
    boxes, values out of range beyond ``tolerance`` and mis-declared units.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown box unit {unit!r}; expected one of {UNITS}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as e:
        raise ValueError(f"box {box!r} is not a sequence of numbers") from e
    if len(values) != 4:
        raise ValueError(f"box {box!r} has {len(values)} values, expected 4")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {box!r} contains NaN or inf")

    if unit == "norm":
        if max(abs(v) for v in values) > 1.0 + tolerance:
            raise ValueError(f"box {box!r} declared 'norm' but has values > 1 (pixels or 0-1000?)")
        x1, y1, x2, y2 = values
    elif unit == "1000":
        x1, y1, x2, y2 = (v / 1000.0 for v in values)
    else:
        if width is None or height is None:
            raise ValueError(f"box unit {unit!r} needs the frame's width and height")
        if not (width > 0 and height > 0):
            raise ValueError(f"frame size {width}x{height} must be positive")
        if unit == "xywh_pixel":
            x, y, w, h = values
            if w <= 0 or h <= 0:
                raise ValueError(f"box {box!r} has non-positive width/height (zero-area or inverted)")
            values = [x, y, x + w, y + h]
        x1, y1, x2, y2 = values[0] / width, values[1] / height, values[2] / width, values[3] / height

    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {box!r} is inverted (x2 < x1 or y2 < y1)")
    for v in (x1, y1, x2, y2):
        if v < -tolerance or v > 1.0 + tolerance:
            raise ValueError(f"box {box!r} lies out of the frame (normalized value {v:.3f})")
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box!r} has zero area")
    return (x1, y1, x2, y2)


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = box_area((ix1, iy1, ix2, iy2))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
