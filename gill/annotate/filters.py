"""Quality filters for VLM grounding output (DESIGN §8).

VLMs give no confidence score, so quality comes from rules. Each rule is configurable and every object it
drops is counted under its name, so the run summary says what each filter did:

* ``label_unrelated``  — the label does not relate to the caption (the model invented an object);
* ``box_too_small``    — a side below ``min_box_side`` or an area below ``min_box_area`` (normalized);
* ``box_whole_image``  — area above ``max_box_area`` ("the whole picture" is no layout);
* ``duplicate_merged`` — same label, IoU above ``dedup_iou``: the later box is merged into the earlier one;
* ``over_max_objects`` — beyond ``max_objects`` per image (the spatial adapter has a fixed number of slots).

Image-level rejections (unreadable file, aspect ratio past the limit) happen in :mod:`gill.annotate.sources`.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gill.data.boxes import box_area, box_iou
from gill.data.grounding import GroundedObject

FILTER_NAMES = ("label_unrelated", "box_too_small", "box_whole_image", "duplicate_merged", "over_max_objects")


@dataclass
class FilterConfig:
    label_match: str = "overlap"      # "overlap" | "substring" | "off"
    min_label_overlap: float = 0.5    # share of the label's characters/words found in the caption
    min_box_side: float = 0.02
    min_box_area: float = 0.001
    max_box_area: float = 0.95
    dedup_iou: float = 0.5
    max_objects: int = 30

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> "FilterConfig":
        m = dict(m or {})
        return cls(**{k: v for k, v in m.items() if k in cls.__dataclass_fields__})


def _normalize_text(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).lower()
    return re.sub(r"[\s\W_]+", " ", s).strip()


def _units(s: str) -> list[str]:
    # CJK text has no spaces: compare characters; other scripts compare words.
    units: list[str] = []
    for word in s.split():
        if any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in word):
            units.extend(ch for ch in word if not ch.isspace())
        else:
            units.append(word)
    return units


def label_relates(label: str, caption: str, mode: str = "overlap", min_overlap: float = 0.5) -> bool:
    """True when ``label`` is grounded in ``caption`` (substring, or enough shared characters/words)."""
    if mode == "off":
        return True
    lab, cap = _normalize_text(label), _normalize_text(caption)
    if not lab:
        return False
    if lab in cap or lab.replace(" ", "") in cap.replace(" ", ""):
        return True
    if mode == "substring":
        return False
    units = _units(lab)
    cap_units = set(_units(cap)) | set(cap.replace(" ", ""))
    hit = sum(1 for u in units if u in cap_units or (len(u) > 3 and u.rstrip("s") in cap_units))
    return bool(units) and hit / len(units) >= min_overlap


def apply_filters(objects: Sequence[GroundedObject], caption: str, cfg: FilterConfig,
                  counts: Counter | None = None) -> list[GroundedObject]:
    """Return the objects that pass, in the model's order; add drop counts to ``counts``."""
    counts = counts if counts is not None else Counter()
    kept: list[GroundedObject] = []
    for obj in objects:
        x1, y1, x2, y2 = obj.bbox
        if not label_relates(obj.label, caption, cfg.label_match, cfg.min_label_overlap):
            counts["label_unrelated"] += 1
            continue
        area = box_area(obj.bbox)
        if min(x2 - x1, y2 - y1) < cfg.min_box_side or area < cfg.min_box_area:
            counts["box_too_small"] += 1
            continue
        if area > cfg.max_box_area:
            counts["box_whole_image"] += 1
            continue
        # the model lists its most salient boxes first, so the earlier box of a duplicate pair wins
        if any(k.label == obj.label and box_iou(k.bbox, obj.bbox) > cfg.dedup_iou for k in kept):
            counts["duplicate_merged"] += 1
            continue
        kept.append(obj)
    if cfg.max_objects and len(kept) > cfg.max_objects:
        counts["over_max_objects"] += len(kept) - cfg.max_objects
        kept = kept[: cfg.max_objects]
    return kept
