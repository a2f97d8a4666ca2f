"""The layout dataset: a DESIGN §7 JSONL of image + caption + boxes, validated and transformed.

Every line is read and checked once, at construction. A bad record is skipped, logged once and
counted by reason in ``skipped`` (with ``(line_no, id, reason)`` in ``skipped_records``); a bad
object inside a good record is dropped and counted in ``dropped_objects``. An image that fails
to decode during training is logged, counted and replaced by the next decodable item, so one
broken file never stops a run. Nothing is dropped silently.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from gill.data.boxes import UNITS, box_area, normalize_bbox
from gill.data.transforms import LayoutTransform

logger = logging.getLogger(__name__)


class _Skip(Exception):
    """A record is unusable; ``args[0]`` is the counted reason."""


def _require(record: dict, key: str, types) -> object:
    if key not in record:
        raise _Skip(f"missing_field:{key}")
    value = record[key]
    # bool is an int subclass; a width of `true` is a typo, not a size.
    if isinstance(value, bool) or not isinstance(value, types):
        raise _Skip(f"wrong_type:{key}")
    return value


def _size(record: dict, key: str) -> int:
    value = _require(record, key, (int, float))
    if not (math.isfinite(value) and value == int(value) and value > 0):
        raise _Skip(f"bad_size:{key}")
    return int(value)


class LayoutDataset:
    """Items ``{"id", "image", "caption", "objects", "original_size", "crop_top_left"}`` from a JSONL.

    ``image`` paths are relative to ``image_root`` and must stay inside it after resolving
    ``..`` and symlinks. Boxes are in ``bbox_unit`` (a record's own ``"bbox_unit"`` overrides it;
    see :data:`gill.data.boxes.UNITS`) and become normalized boxes of the original image; the
    transform then maps them into the ``resolution`` square. Per-item randomness is seeded by
    ``(seed, epoch, index)``: call :meth:`set_epoch` each epoch (in every DataLoader worker, so
    use non-persistent workers or re-create the iterator per epoch).
    """

    def __init__(self, path: str | Path, image_root: str | Path, resolution: int, center_crop: bool = True,
                 random_flip: float = 0.5, seed: int = 0, max_objects: int = 30, bbox_unit: str = "norm"):
        if bbox_unit not in UNITS:
            raise ValueError(f"bbox_unit must be one of {UNITS}, got {bbox_unit!r}")
        self.path = Path(path)
        self.image_root = Path(image_root).resolve()
        self.transform = LayoutTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        self.seed = seed
        self.epoch = 0
        self.max_objects = max_objects
        self.bbox_unit = bbox_unit
        self.skipped: Counter = Counter()
        self.skipped_records: list[tuple[int, str | None, str]] = []
        self.dropped_objects: Counter = Counter()
        self.records: list[dict] = []
        self._undecodable: set[int] = set()
        self._load()
        if not self.records:
            logger.warning("%s: no usable records (skipped: %s)", self.path, dict(self.skipped))

    # ---------------------------------------------------------------- construction
    def _load(self) -> None:
        seen_ids: set[str] = set()
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                record_id = None
                try:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise _Skip("invalid_json") from None
                    if not isinstance(record, dict):
                        raise _Skip("not_an_object")
                    if isinstance(record.get("id"), str):
                        record_id = record["id"]
                    parsed = self._parse(record, line_no)
                    if parsed["id"] in seen_ids:
                        raise _Skip("duplicate_id")
                except _Skip as skip:
                    self._skip(line_no, record_id, skip.args[0])
                    continue
                seen_ids.add(parsed["id"])
                self.records.append(parsed)

    def _skip(self, line_no: int, record_id: str | None, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_records.append((line_no, record_id, reason))
        logger.warning("%s:%d (id=%s): skipped record: %s", self.path, line_no, record_id, reason)

    def _parse(self, record: dict, line_no: int) -> dict:
        record_id = _require(record, "id", str)
        if not record_id:
            raise _Skip("empty_id")
        caption = _require(record, "caption", str)
        if not caption.strip():
            raise _Skip("empty_caption")
        width, height = _size(record, "width"), _size(record, "height")
        image_path = self._image_path(_require(record, "image", str))
        unit = record.get("bbox_unit", self.bbox_unit)
        if unit not in UNITS:
            raise _Skip("bad_bbox_unit")
        raw_objects = _require(record, "objects", list)

        objects, drops = [], Counter()
        for obj in raw_objects:
            if not isinstance(obj, dict):
                drops["object_not_a_dict"] += 1
                continue
            label = obj.get("label")
            if not isinstance(label, str) or not label.strip():
                drops["bad_label"] += 1
                continue
            if "bbox" not in obj:
                drops["missing_bbox"] += 1
                continue
            try:
                bbox = normalize_bbox(obj["bbox"], unit, width, height)
            except ValueError:
                drops["bad_bbox"] += 1
                continue
            objects.append({"label": label.strip(), "bbox": bbox})
        if drops:
            self.dropped_objects.update(drops)
            logger.warning("%s:%d (id=%s): dropped objects: %s", self.path, line_no, record_id, dict(drops))
        # Stable sort: ties keep the annotator's order.
        objects.sort(key=lambda o: -box_area(o["bbox"]))
        return {"id": record_id, "image": image_path, "caption": caption, "objects": objects,
                "line_no": line_no}

    def _image_path(self, rel: str) -> Path:
        if not rel:
            raise _Skip("empty_image_path")
        if os.path.isabs(rel) or rel.startswith(("/", "\\")):
            raise _Skip("absolute_image_path")
        # resolve() follows symlinks and collapses "..", so a link inside the root that
        # points outside it is caught here just like a literal "../".
        resolved = (self.image_root / rel).resolve()
        if not resolved.is_relative_to(self.image_root):
            raise _Skip("image_path_escapes_root")
        if not resolved.is_file():
            raise _Skip("missing_image")
        return resolved

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _decode(self, index: int) -> Image.Image | None:
        record = self.records[index]
        if index in self._undecodable:
            return None
        try:
            with Image.open(record["image"]) as im:
                im.load()
                return im.convert("RGB")
        # PIL raises many types for broken files (OSError, SyntaxError, ValueError,
        # DecompressionBombError, ...); any of them means "this file is unusable".
        except Exception as e:  # noqa: BLE001
            self._undecodable.add(index)
            self.skipped["undecodable_image"] += 1
            self.skipped_records.append((record["line_no"], record["id"], "undecodable_image"))
            logger.warning("%s:%d (id=%s): cannot decode %s (%s: %s); using the next item instead",
                           self.path, record["line_no"], record["id"], record["image"], type(e).__name__, e)
            return None

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        if not 0 <= index < n:
            raise IndexError(index)
        # Walk forward (wrapping) to the first decodable item: deterministic, and it never
        # stops a training run for one broken file.
        for step in range(n):
            i = (index + step) % n
            image = self._decode(i)
            if image is not None:
                return self._item(i, image)
        raise RuntimeError(f"{self.path}: none of the {n} images can be decoded")

    def item_at(self, index: int) -> dict | None:
        """Item ``index`` itself, or ``None`` when its image cannot be decoded (counted and logged
        as in :meth:`__getitem__`, which would substitute the next item instead). For passes that
        must see every record exactly once, e.g. building the encoder cache."""
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        image = self._decode(index)
        return None if image is None else self._item(index, image)

    def is_random(self) -> bool:
        """Whether items depend on the seed/epoch (random flip or random crop)."""
        return self.transform.random_flip > 0.0 or not self.transform.center_crop

    def _item(self, index: int, image: Image.Image) -> dict:
        record = self.records[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        original_size = (image.height, image.width)
        image, objects, crop_top_left = self.transform(image, record["objects"], rng)
        objects.sort(key=lambda o: -box_area(o["bbox"]))  # clipping can change the order
        return {"id": record["id"], "image": image, "caption": record["caption"],
                "objects": objects[: self.max_objects], "original_size": original_size,
                "crop_top_left": crop_top_left}
