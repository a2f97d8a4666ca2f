"""Input sources for annotation, and image loading (the CPU half of the pipeline).

Readers turn a data file into *items*: plain dicts ``{"id", "image", "caption", "path" | "data", "error"}``.
``image`` is the path relative to the data root that ends up in the layout record (DESIGN §7); ``path`` is
the resolved file; ``data`` holds the bytes of a webdataset member. A row that cannot be used (malformed,
path escaping the root) still becomes an item, with ``error`` set, so it lands in the errors file.

* ``wukong_csv``  — Wukong's release CSV ``url,caption`` next to an img2dataset *files* folder: row ``i`` is
  ``{i // shard_size:05d}/{key}.jpg`` with ``key = f"{shard:05d}{i % shard_size:0{digits}d}"``
  (img2dataset's naming; a row whose download failed has no file and is reported as ``missing_file``).
* ``tsv`` / ``csv`` — ``image path, caption`` (optionally a header naming ``image``/``caption``/``id``).
* ``webdataset`` — img2dataset tar shards (``KEY.jpg`` + ``KEY.txt``); images are extracted under
  ``extract_root`` so the layout JSONL can point at real files.

:func:`load_image` opens, checks and resizes one image to the model's input grid; it runs outside the GPU
actor (Ray tasks, or a thread pool in one process).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import numpy as np

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_HEADER_IMAGE = {"image", "image_path", "path", "file", "filepath", "filename", "img"}
_HEADER_CAPTION = {"caption", "text", "title", "description"}


class PathEscapesRoot(ValueError):
    pass


def resolve_inside(root: str | Path, rel: str) -> tuple[str, Path]:
    """``(normalized relative posix path, absolute path)`` of ``rel`` under ``root``; refuses to leave it."""
    rel = rel.strip().replace("\\", "/")
    if not rel:
        raise PathEscapesRoot("empty image path")
    if PurePosixPath(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise PathEscapesRoot(f"absolute image path {rel!r}")
    root_abs = Path(root).resolve()
    full = (root_abs / rel).resolve()  # resolves '..' and symlinks
    if not full.is_relative_to(root_abs):
        raise PathEscapesRoot(f"image path {rel!r} escapes the image root")
    return full.relative_to(root_abs).as_posix(), full


def _item(id_: str, image: str = "", caption: str = "", error: str = "", **extra: Any) -> dict:
    return {"id": id_, "image": image, "caption": caption, "error": error, **extra}


def read_wukong_csv(path: str, image_root: str, *, id_prefix: str = "wukong", shard_size: int = 10000,
                    image_ext: str = "jpg") -> Iterator[dict]:
    digits = max(1, math.ceil(math.log10(shard_size)))  # img2dataset's oom_sample_per_shard
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        row_idx = 0
        for n, row in enumerate(reader):
            if n == 0 and row and row[0].strip().lower() == "url":
                continue  # header
            i = row_idx
            row_idx += 1
            shard, key = i // shard_size, f"{i // shard_size:05d}{i % shard_size:0{digits}d}"
            id_ = f"{id_prefix}_{key}"
            if len(row) != 2 or not row[1].strip():
                yield _item(id_, error=f"malformed_row: line {reader.line_num}: expected url,caption")
                continue
            rel, full = resolve_inside(image_root, f"{shard:05d}/{key}.{image_ext}")
            yield _item(id_, rel, row[1].strip(), path=str(full))


def read_pairs(path: str, image_root: str, *, delimiter: str = "\t", id_prefix: str = "img") -> Iterator[dict]:
    """``image path<delim>caption`` rows; a header (``image``, ``caption``, optional ``id``) is recognized."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV captions contain quotes
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        cols = {"image": 0, "caption": 1, "id": None}
        ncols = 2
        row_idx = 0
        for n, row in enumerate(reader):
            if n == 0 and row and row[0].strip().lower() in _HEADER_IMAGE | {"id"}:
                names = [c.strip().lower() for c in row]
                cols = {
                    "image": next((i for i, c in enumerate(names) if c in _HEADER_IMAGE), 0),
                    "caption": next((i for i, c in enumerate(names) if c in _HEADER_CAPTION), 1),
                    "id": names.index("id") if "id" in names else None,
                }
                ncols = len(names)
                continue
            if not row:  # blank line
                continue
            i = row_idx
            row_idx += 1
            id_ = f"{id_prefix}_{i:08d}"
            if len(row) != ncols:
                yield _item(id_, error=f"malformed_row: line {reader.line_num}: {len(row)} fields, expected {ncols}")
                continue
            if cols["id"] is not None and row[cols["id"]].strip():
                id_ = row[cols["id"]].strip()
            caption = row[cols["caption"]].strip()
            if not caption:
                yield _item(id_, error=f"malformed_row: line {reader.line_num}: empty caption")
                continue
            try:
                rel, full = resolve_inside(image_root, row[cols["image"]])
            except PathEscapesRoot as e:
                yield _item(id_, caption=caption, error=f"bad_path: {e}")
                continue
            yield _item(id_, rel, caption, path=str(full))


def read_webdataset(pattern: str, extract_root: str, *, id_prefix: str = "wds") -> Iterator[dict]:
    """img2dataset webdataset shards: members grouped by key; caption from ``.txt`` (or ``.json``)."""
    for shard in sorted(glob.glob(pattern)):
        stem = Path(shard).name.split(".")[0]
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = PurePosixPath(m.name).name
                    key, _, ext = name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            yield _item(f"{id_prefix}_{stem}", error=f"unreadable_shard: {e}")
            continue
        for key, parts in groups.items():
            id_ = f"{id_prefix}_{key}"
            ext = next((e for e in _IMAGE_EXTS if e in parts), None)
            caption = parts.get("txt", b"").decode("utf-8", "replace").strip()
            if not caption and "json" in parts:
                try:
                    caption = str(json.loads(parts["json"]).get("caption") or "").strip()
                except (ValueError, AttributeError):
                    caption = ""
            if ext is None or not caption:
                yield _item(id_, error="malformed_row: webdataset sample without image or caption")
                continue
            rel, full = resolve_inside(extract_root, f"{stem}/{key}.{ext}")
            yield _item(id_, rel, caption, path=str(full), data=parts[ext])


def iter_items(source: Mapping[str, Any]) -> Iterator[dict]:
    """Items of the configured source (``cfg.source``)."""
    kind = source["kind"]
    if kind == "wukong_csv":
        return read_wukong_csv(source["path"], source["image_root"], id_prefix=source.get("id_prefix") or "wukong",
                               shard_size=int(source.get("shard_size") or 10000),
                               image_ext=source.get("image_ext") or "jpg")
    if kind in ("tsv", "csv"):
        return read_pairs(source["path"], source["image_root"], delimiter="\t" if kind == "tsv" else ",",
                          id_prefix=source.get("id_prefix") or "img")
    if kind == "webdataset":
        return read_webdataset(source["path"], source["image_root"], id_prefix=source.get("id_prefix") or "wds")
    raise ValueError(f"unknown source kind {kind!r}; expected wukong_csv, tsv, csv or webdataset")


# --------------------------------------------------------------------------- images

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule (``qwen_vl_utils.smart_resize``): sides multiples of ``factor`` (patch × merge),
    area within ``[min_pixels, max_pixels]``, aspect ratio kept. Re-implemented because qwen_vl_utils imports
    torchvision at module level; the arithmetic is the same."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(item: Mapping[str, Any], *, factor: int = 28, min_pixels: int = 56 * 56,
               max_pixels: int = 448 * 448, max_aspect: float = 200.0) -> dict:
    """Open, check and resize one item's image. Returns the item's fields plus ``width``/``height`` of the
    original, and ``pixels``: the resized uint8 HxWx3 array (empty on error, with ``error`` set)."""
    from PIL import Image

    out = {"id": item["id"], "image": item.get("image", ""), "caption": item.get("caption", ""),
           "error": item.get("error", ""), "width": 0, "height": 0,
           "pixels": np.zeros((0, 0, 3), np.uint8)}
    if out["error"]:
        return out
    try:
        path = item.get("path")
        data = item.get("data")
        if data is not None and len(data):
            # webdataset: write the member once so the layout record points at a real file
            if path and not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            src = io.BytesIO(data)
        else:
            if not path or not os.path.isfile(path):
                out["error"] = "missing_file"
                return out
            src = path
        with Image.open(src) as im:
            im.load()
            img = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-record error
        out["error"] = f"unreadable_image: {type(e).__name__}: {e}"[:300]
        return out
    w, h = img.size
    out["width"], out["height"] = w, h
    if max(w, h) / max(1, min(w, h)) > max_aspect:
        out["error"] = f"aspect_ratio: {max(w, h) / max(1, min(w, h)):.1f} > {max_aspect:g}"
        return out
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC)
    out["pixels"] = np.asarray(img, dtype=np.uint8)
    return out
