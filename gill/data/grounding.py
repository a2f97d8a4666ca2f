"""Parsing grounding output of vision-language models into normalized boxes (DESIGN §8).

One entry point, :func:`parse_grounding`, for the three output styles the annotation backends produce:

* ``"qwen2vl"``  — Qwen2-VL's native tokens,
  ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, integers 0–1000;
  one label may carry several boxes (several ``<|box_start|>`` blocks, or several point pairs in one block).
* ``"qwen25vl"`` — JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` in absolute pixels of the
  **resized model input** (``width``/``height`` give that frame).
* ``"json1000"`` — the same JSON in 0–1000 (Qwen3-VL, and the seed's strict JSON prompt).

Model output is untrusted text: this module never raises on it. Garbage yields ``[]`` and the caller
records why. Each box goes through :func:`gill.data.boxes.normalize_bbox`, the project's one unit boundary.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from gill.data.boxes import normalize_bbox

FORMATS = ("qwen2vl", "qwen25vl", "json1000")

# Coordinates further than this factor past the frame are garbage, not "the edge" (a model writing
# 0–1000 numbers where pixels were asked, say). Nearer overshoots are clipped to the frame.
_MAX_OVERSHOOT = 1.5


@dataclass(frozen=True)
class GroundedObject:
    label: str
    bbox: tuple[float, float, float, float]  # normalized (x1, y1, x2, y2) of the image

    def to_dict(self, ndigits: int = 4) -> dict[str, Any]:
        return {"label": self.label, "bbox": [round(v, ndigits) for v in self.bbox]}


def parse_grounding(text: Any, *, width: float | None = None, height: float | None = None,
                    fmt: str = "qwen2vl") -> list[GroundedObject]:
    """Objects with ``label`` and normalized ``bbox`` found in ``text``; ``[]`` for anything unusable.

    ``width``/``height`` are the coordinate frame of the pixel format (``qwen25vl``: the resized input the
    model saw); the 0–1000 formats ignore them. Unknown ``fmt`` is a programming error and does raise.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown grounding format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(text, str) or not text.strip():
        return []
    try:
        raw = _parse_qwen2vl(text) if fmt == "qwen2vl" else _parse_json_objects(text)
        if fmt == "qwen25vl":
            if not (width and height and width > 0 and height > 0):
                return []
            frame = (float(width), float(height))
        else:
            frame = (1000.0, 1000.0)
        out: list[GroundedObject] = []
        seen: set[tuple] = set()
        for label, coords in raw:
            obj = _make_object(label, coords, frame)
            if obj is None:
                continue
            key = (obj.label, tuple(round(v, 4) for v in obj.bbox))
            if key in seen:  # exact repeats: models loop; keep one
                continue
            seen.add(key)
            out.append(obj)
        return out
    except Exception:  # noqa: BLE001 - the contract is "never raises on model output"
        return []


# --------------------------------------------------------------------------- boxes

def _make_object(label: Any, coords: Any, frame: tuple[float, float]) -> GroundedObject | None:
    label = _clean_label(label)
    if not label:
        return None
    try:
        vals = [float(v) for v in coords]
    except (TypeError, ValueError):
        return None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    fw, fh = frame
    x1, y1, x2, y2 = vals
    x1, x2 = sorted((x1, x2))  # swapped corners: the model meant the same rectangle
    y1, y2 = sorted((y1, y2))
    if x2 < -fw * (_MAX_OVERSHOOT - 1) or y2 < -fh * (_MAX_OVERSHOOT - 1):
        return None
    if x2 > fw * _MAX_OVERSHOOT or y2 > fh * _MAX_OVERSHOOT:
        return None
    # clip overshoot to the frame: "1005" and "-3" mean the edge
    x1, x2 = (min(max(v, 0.0), fw) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), fh) for v in (y1, y2))
    try:
        if frame == (1000.0, 1000.0):
            box = normalize_bbox((x1, y1, x2, y2), "1000")
        else:
            box = normalize_bbox((x1, y1, x2, y2), "pixel", fw, fh)
    except ValueError:  # zero area after clipping, etc.
        return None
    return GroundedObject(label, box)


_LABEL_STRIP = " \t\r\n\"'`“”‘’「」『』:：,，.。;；"


def _clean_label(label: Any) -> str:
    if label is None:
        return ""
    if not isinstance(label, str):
        if isinstance(label, (int, float)):
            label = str(label)
        else:
            return ""
    label = re.sub(r"<\|[^|>]*\|>", "", label)  # stray special tokens
    label = re.sub(r"\s+", " ", label).strip(_LABEL_STRIP)
    return label[:100]


# --------------------------------------------------------------------------- qwen2vl tokens

_NUM = r"-?\d+(?:\.\d+)?"
_POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)


def _parse_qwen2vl(text: str) -> list[tuple[str, list[float]]]:
    """Walk refs and boxes in order; each box belongs to the last label seen before it.

    A ``<|box_start|>`` without its ``<|box_end|>`` (output truncated at max_new_tokens) is dropped.
    """
    events = [(m.start(), "ref", m.group(1)) for m in _REF.finditer(text)]
    events += [(m.start(), "box", m.group(1)) for m in _BOX.finditer(text)]
    events.sort(key=lambda e: e[0])
    out: list[tuple[str, list[float]]] = []
    label: str | None = None
    for _, kind, payload in events:
        if kind == "ref":
            label = payload
            continue
        if label is None:
            continue
        points = [(float(a), float(b)) for a, b in _POINT.findall(payload)]
        for i in range(0, len(points) - 1, 2):  # several boxes may share one block
            (x1, y1), (x2, y2) = points[i], points[i + 1]
            out.append((label, [x1, y1, x2, y2]))
    return out


# --------------------------------------------------------------------------- JSON

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.S)
_LABEL_KEYS = ("label", "name", "phrase", "object", "category", "text")
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d", "coordinates")


def _parse_json_objects(text: str) -> list[tuple[str, list[float]]]:
    """Find the JSON value in ``text`` (code fences, leading/trailing prose); repair a truncated array."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    value = _first_json_value(body)
    if value is None:
        # truncated mid-array: keep every complete {...} object that parses on its own
        value = []
        for m in re.finditer(r"\{[^{}]*\}", body):
            try:
                value.append(json.loads(m.group(0)))
            except json.JSONDecodeError:
                continue
    return list(_objects_from_value(value))


def _first_json_value(body: str) -> Any:
    decoder = json.JSONDecoder()
    for i, ch in enumerate(body):
        if ch in "[{":
            try:
                value, _ = decoder.raw_decode(body, i)  # ignores whatever prose follows
                return value
            except json.JSONDecodeError:
                return None if ch == "[" else _retry_after(body, i, decoder)
    return None


def _retry_after(body: str, start: int, decoder: json.JSONDecoder) -> Any:
    # a broken leading "{" (prose with braces) must not hide a good array further on
    j = body.find("[", start + 1)
    if j < 0:
        return None
    try:
        return decoder.raw_decode(body, j)[0]
    except json.JSONDecodeError:
        return None


def _objects_from_value(value: Any) -> Iterable[tuple[str, list[float]]]:
    if isinstance(value, dict):
        for key in ("objects", "results", "boxes", "annotations"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
        else:
            value = [value]
    if not isinstance(value, list):
        return
    for item in value:
        if not isinstance(item, dict):
            continue
        label = next((item[k] for k in _LABEL_KEYS if k in item), None)
        box = next((item[k] for k in _BOX_KEYS if k in item), None)
        if isinstance(box, list) and box and all(isinstance(b, list) for b in box):
            for b in box:  # one label, several boxes
                yield label, b
        elif isinstance(box, (list, tuple)):
            yield label, list(box)
