"""The layout dataset: a DESIGN §7 JSONL of image + caption + boxes, validated and transformed.

Every line is read and checked once, at construction. A bad record is skipped, logged once and
counted by reason in ``skipped`` (with ``(line_no, id, reason)`` in ``skipped_records``); a bad
object inside a good record is dropped and counted in ``dropped_objects``. An image that fails
to decode during training, or whose size is not the record's declared ``width``/``height``, is
logged, counted and replaced by the next decodable item, so one broken file never stops a run.
Nothing is dropped silently; records that are kept but worth a look (no objects, every object
cropped away) are counted in ``notices``.

Lines must be UTF-8 (a BOM is accepted): a line in another encoding (GBK, Latin-1) or one holding
U+FFFD (text already decoded lossily upstream) is skipped as ``bad_encoding`` rather than trained
on as replacement characters.

A validation split can be held out of the same file: ``split="train"`` / ``"val"`` with
``val_fraction`` assigns each record by a hash of its id, so the split is deterministic and a
record keeps its side when the file grows.
"""
from __future__ import annotations

import hashlib
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


SPLITS = ("all", "train", "val")
_BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes, first: bool = False) -> str:
    """A JSONL line as text; raises ``_Skip("bad_encoding")`` when it is not clean UTF-8."""
    if first and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("bad_encoding") from None
    if "\ufffd" in text:
        raise _Skip("bad_encoding")
    return text


def split_score(record_id: str) -> float:
    """A record's position in [0, 1) for the train/val split: a hash of its id, not of its line."""
    return int.from_bytes(hashlib.sha1(record_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def implausible_unit(objects: list, unit: str) -> bool:
    """Boxes declared in 0-1000 or pixels whose every coordinate is <= 1: normalized boxes mislabeled
    (as written they would all sit in the top-left thousandth of the image)."""
    if unit == "norm":
        return False
    values = []
    for obj in objects:
        box = obj.get("bbox") if isinstance(obj, dict) else None
        if isinstance(box, (list, tuple)):
            values += [v for v in box if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(values) and max(abs(v) for v in values) <= 1.0


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
                 random_flip: float = 0.5, seed: int = 0, max_objects: int = 30, bbox_unit: str = "norm",
                 split: str = "all", val_fraction: float = 0.0):
        if bbox_unit not in UNITS:
            raise ValueError(f"bbox_unit must be one of {UNITS}, got {bbox_unit!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.split, self.val_fraction = split, float(val_fraction)
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
        self.notices: Counter = Counter()
        self.records: list[dict] = []
        self._undecodable: set[int] = set()
        self._cropped_warned: set[int] = set()
        self._load()
        self.records = self._select_split(self.records)
        if not self.records:
            logger.warning("%s: no usable records (skipped: %s)", self.path, dict(self.skipped))

    # ---------------------------------------------------------------- construction
    def _load(self) -> None:
        seen_ids: set[str] = set()
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                record_id = None
                try:
                    line = decode_line(raw, first=line_no == 1)
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
                if not parsed["objects"]:
                    self.notices["records_without_objects"] += 1
                self.records.append(parsed)

    def _select_split(self, records: list[dict]) -> list[dict]:
        if self.split == "all" or self.val_fraction <= 0.0:
            return records
        val = {r["id"] for r in records if split_score(r["id"]) < self.val_fraction}
        if not val and len(records) > 1:  # a small file still gets one validation record
            val = {min((r["id"] for r in records), key=split_score)}
        keep = [r for r in records if (r["id"] in val) == (self.split == "val")]
        logger.info("%s: %s split: %d of %d records (val_fraction=%g)", self.path, self.split, len(keep),
                    len(records), self.val_fraction)
        return keep

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
        if implausible_unit(raw_objects, unit):
            raise _Skip("implausible_bbox_unit")

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
                "line_no": line_no, "size": (width, height)}

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
                image = im.convert("RGB")
        # PIL raises many types for broken files (OSError, SyntaxError, ValueError,
        # DecompressionBombError, ...); any of them means "this file is unusable".
        except Exception as e:  # noqa: BLE001
            return self._unusable(index, "undecodable_image", f"cannot decode {record['image']} "
                                                               f"({type(e).__name__}: {e})")
        if image.size != record["size"]:
            # the boxes were drawn on an image of the declared size: on another file they point elsewhere
            return self._unusable(index, "size_mismatch", f"{record['image']} is {image.size[0]}x{image.size[1]}, "
                                                          f"the record says {record['size'][0]}x{record['size'][1]}")
        return image

    def _unusable(self, index: int, reason: str, message: str) -> None:
        record = self.records[index]
        self._undecodable.add(index)
        self.skipped[reason] += 1
        self.skipped_records.append((record["line_no"], record["id"], reason))
        logger.warning("%s:%d (id=%s): %s; using the next item instead", self.path, record["line_no"],
                       record["id"], message)
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
        if len(objects) < len(record["objects"]):
            lost = len(record["objects"]) - len(objects)
            self.dropped_objects["cropped_out"] += lost
            if not objects:
                self.notices["all_objects_cropped_out"] += 1
            if index not in self._cropped_warned:  # once per record, not once per epoch
                self._cropped_warned.add(index)
                logger.warning("%s:%d (id=%s): %d of %d boxes shrink to nothing in the %d px crop%s",
                               self.path, record["line_no"], record["id"], lost, len(record["objects"]),
                               self.transform.resolution, "; no object left" if not objects else "")
        objects.sort(key=lambda o: -box_area(o["bbox"]))  # clipping can change the order
        return {"id": record["id"], "image": image, "caption": record["caption"],
                "objects": objects[: self.max_objects], "original_size": original_size,
                "crop_top_left": crop_top_left}
