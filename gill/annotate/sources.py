"""Input sources for annotation, and image loading (the CPU half of the pipeline).

Readers turn a data file into *items*: plain dicts ``{"id", "image", "caption", "path" | "data", "error"}``.
``image`` is the path relative to the data root that ends up in the layout record (DESIGN §7); ``path`` is
the resolved file; ``data`` holds the bytes of a webdataset member. A row that cannot be used (malformed,
not UTF-8, path escaping the root, failed download) still becomes an item, with ``error`` set, so it lands
in the errors file with its reason.

* ``img2dataset`` — the output folder of an img2dataset run (``--output_format files`` or ``webdataset``).
  Every shard's ``NNNNN.parquet`` lists every input row with img2dataset's own ``key``, ``status`` and
  ``error_message``; a row that failed to download or resize becomes an error item with that reason. Images
  are ``NNNNN/KEY.jpg`` (files) or members of ``NNNNN.tar`` read with the ``webdataset`` package (extracted
  under ``image_root`` so the layout JSONL points at real files).
* ``tsv`` / ``csv`` — ``image path, caption`` (optionally a header naming ``image``/``caption``/``id``).
* ``webdataset`` — a glob of tar shards without img2dataset's parquet (``KEY.jpg`` + ``KEY.txt``/``.json``).

Record ids are stable under edits of the input: ``<prefix>_<16 hex of sha1(image path or URL, caption)>``
(or the file's own ``id`` column), never a row number, so inserting a row neither skips a new image nor
annotates an old one twice on resume.

Text must be UTF-8 (a BOM is accepted): a line in another encoding (GBK, Latin-1) is rejected as
``bad_encoding`` rather than annotated with replacement characters.

:func:`load_image` opens, checks and resizes one image to the model's input grid; it runs outside the GPU
actor (Ray tasks, or a thread pool in one process).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
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


def stable_id(prefix: str, ref: str, caption: str) -> str:
    """Id of an (image path or URL, caption) pair: the same pair gets the same id wherever its row moves."""
    raw = f"{ref}\n{caption}".encode("utf-8", "surrogateescape")
    return f"{prefix}_{hashlib.sha1(raw).hexdigest()[:16]}"


def not_utf8(*texts: str) -> bool:
    """Whether text read with ``surrogateescape`` held bytes that are not UTF-8, or carries U+FFFD (text
    that an earlier tool already decoded with ``errors="replace"``)."""
    return any("\ufffd" in t or any("\udc80" <= ch <= "\udcff" for ch in t) for t in texts)


def _bad_encoding(where: str) -> str:
    return f"bad_encoding: {where}: not UTF-8 (convert the file, e.g. iconv -f GBK -t UTF-8)"


def _item(id_: str, image: str = "", caption: str = "", error: str = "", **extra: Any) -> dict:
    return {"id": id_, "image": image, "caption": caption, "error": error, **extra}


def _printable(text: str) -> str:
    # an error record is JSON: lone surrogates from undecodable bytes cannot be written as UTF-8
    return text.encode("utf-8", "replace").decode("utf-8") if not_utf8(text) else text


def read_pairs(path: str, image_root: str, *, delimiter: str = "\t", id_prefix: str = "img") -> Iterator[dict]:
    """``image path<delim>caption`` rows; a header (``image``, ``caption``, optional ``id``) is recognized."""
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file;
    # utf-8-sig drops a BOM
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV captions contain quotes
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        cols = {"image": 0, "caption": 1, "id": None}
        ncols = 2
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
            where = f"line {reader.line_num}"
            id_ = stable_id(id_prefix, delimiter.join(row), "")  # replaced below once the row is understood
            if len(row) != ncols:
                yield _item(id_, error=f"malformed_row: {where}: {len(row)} fields, expected {ncols}")
                continue
            caption, image = row[cols["caption"]].strip(), row[cols["image"]].strip()
            id_ = stable_id(id_prefix, image, caption)
            if cols["id"] is not None and row[cols["id"]].strip():
                id_ = row[cols["id"]].strip()
            if not_utf8(*row):
                yield _item(_printable(id_), _printable(image), _printable(caption), _bad_encoding(where))
                continue
            if not caption:
                yield _item(id_, error=f"malformed_row: {where}: empty caption")
                continue
            try:
                rel, full = resolve_inside(image_root, image)
            except PathEscapesRoot as e:
                yield _item(id_, caption=caption, error=f"bad_path: {e}")
                continue
            yield _item(id_, rel, caption, path=str(full))


# --------------------------------------------------------------------------- img2dataset / webdataset

def _decode_text(raw: bytes | str | None) -> str | None:
    """UTF-8 text of a member (BOM dropped), or ``None`` when it is not UTF-8."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return None if not_utf8(raw) else raw
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if not_utf8(text) else text


def _iter_tar_samples(shard: str) -> Iterator[dict]:
    """Samples of one webdataset tar, grouped by key by the ``webdataset`` package (raw bytes, no decoding)."""
    import webdataset as wds

    yield from wds.WebDataset(shard, shardshuffle=False, empty_check=False)


def _image_member(sample: Mapping[str, Any]) -> str | None:
    return next((e for e in _IMAGE_EXTS if e in sample), None)


def read_img2dataset(folder: str, image_root: str | None = None, *, id_prefix: str = "wukong") -> Iterator[dict]:
    """Items of an img2dataset output folder, joined on img2dataset's own per-shard metadata.

    ``NNNNN.parquet`` holds one row per input row (``url``, ``caption``, ``key``, ``status``,
    ``error_message``, ``width``/``height`` of the saved image, ``original_width``/``original_height``, and
    the ``--save_additional_columns``). ``status != "success"`` becomes an error item with reason
    ``failed_to_download`` / ``failed_to_resize`` and img2dataset's message. A success row's image is
    ``NNNNN/KEY.jpg`` (files) or the ``KEY`` sample of ``NNNNN.tar`` (webdataset, extracted under
    ``image_root``; default: the folder itself).
    """
    import pyarrow.parquet as pq

    root = Path(folder)
    image_root = image_root or folder
    parquets = sorted(root.glob("*.parquet"))
    if not parquets:
        raise FileNotFoundError(
            f"{folder}: no img2dataset shard metadata (NNNNN.parquet); run img2dataset with its default "
            "--save_metadata (see docs/annotate.md), or use source.kind=webdataset for bare tar shards")
    for meta_file in parquets:
        shard = meta_file.stem
        rows = pq.read_table(meta_file).to_pylist()
        tar = root / f"{shard}.tar"
        if tar.is_file():
            yield from _join_tar(rows, str(tar), shard, image_root, id_prefix)
        else:
            for row in rows:
                yield _img2dataset_item(row, shard, image_root, id_prefix, data=None)


def _img2dataset_item(row: Mapping[str, Any], shard: str, image_root: str, id_prefix: str,
                      data: bytes | None, caption_override: str | None = None) -> dict:
    url = str(row.get("url") or "")
    caption = caption_override if caption_override is not None else row.get("caption")
    caption = "" if caption is None else str(caption)
    id_ = stable_id(id_prefix, url or str(row.get("key")), caption)
    status = str(row.get("status") or "")
    if status != "success":
        detail = str(row.get("error_message") or "no message")
        return _item(id_, caption=_printable(caption), error=f"{status or 'failed'}: {detail}", url=url)
    if not_utf8(caption):
        return _item(id_, caption=_printable(caption), error=_bad_encoding(f"shard {shard}"), url=url)
    if not caption.strip():
        return _item(id_, error=f"malformed_row: shard {shard} key {row.get('key')}: empty caption", url=url)
    rel, full = resolve_inside(image_root, f"{shard}/{row['key']}.jpg")
    # img2dataset's width/height: the saved (resized) image, which the record's width/height must match
    return _item(id_, rel, caption.strip(), path=str(full), data=data, url=url,
                 declared_width=int(row.get("width") or 0), declared_height=int(row.get("height") or 0))


def _join_tar(rows: list[dict], tar: str, shard: str, image_root: str, id_prefix: str) -> Iterator[dict]:
    by_key = {str(r["key"]): r for r in rows}
    seen = set()
    try:
        for sample in _iter_tar_samples(tar):
            key = PurePosixPath(sample["__key__"]).name
            row = by_key.get(key)
            if row is None:  # a sample the metadata does not list: still usable from its own .json
                row = json.loads(_decode_text(sample.get("json")) or "{}") or {"key": key, "status": "success"}
            seen.add(key)
            ext = _image_member(sample)
            caption = _decode_text(sample.get("txt")) if "txt" in sample else row.get("caption")
            if caption is None:
                yield _item(stable_id(id_prefix, str(row.get("url") or key), ""),
                            error=_bad_encoding(f"{tar} {key}.txt"))
                continue
            if ext is None:
                yield _item(stable_id(id_prefix, str(row.get("url") or key), caption),
                            error=f"missing_file: {tar}: sample {key} has no image")
                continue
            item = _img2dataset_item({**row, "key": key}, shard, image_root, id_prefix, sample[ext], caption)
            if ext != "jpg" and not item["error"]:
                item["image"], item["path"] = (str(x) for x in resolve_inside(image_root, f"{shard}/{key}.{ext}"))
            yield item
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar fails this shard, not the run
        yield _item(f"{id_prefix}_{shard}", error=f"unreadable_shard: {tar}: {type(e).__name__}: {e}")
    for key, row in by_key.items():
        if key not in seen:  # failed downloads (never written to the tar), and successes that are missing
            if row.get("status") == "success":
                yield _item(stable_id(id_prefix, str(row.get("url") or key), str(row.get("caption") or "")),
                            error=f"missing_file: {tar}: no sample {key}")
            else:
                yield _img2dataset_item(row, shard, image_root, id_prefix, None)


def read_webdataset(pattern: str, extract_root: str, *, id_prefix: str = "wds") -> Iterator[dict]:
    """Bare webdataset shards: ``KEY.<image>`` + caption in ``KEY.txt`` (or ``caption`` of ``KEY.json``)."""
    for shard in sorted(glob.glob(pattern)):
        stem = Path(shard).name.split(".")[0]
        try:
            for sample in _iter_tar_samples(shard):
                key = PurePosixPath(sample["__key__"]).name
                meta = {}
                if "json" in sample:
                    try:
                        meta = json.loads(sample["json"])
                    except ValueError:
                        meta = {}
                caption = _decode_text(sample["txt"]) if "txt" in sample else str(meta.get("caption") or "")
                ref = str(meta.get("url") or f"{stem}/{key}")
                if caption is None:
                    yield _item(stable_id(id_prefix, ref, ""), error=_bad_encoding(f"{shard} {key}.txt"))
                    continue
                caption = caption.strip()
                id_ = stable_id(id_prefix, ref, caption)
                ext = _image_member(sample)
                if ext is None or not caption:
                    yield _item(id_, error="malformed_row: webdataset sample without image or caption")
                    continue
                rel, full = resolve_inside(extract_root, f"{stem}/{key}.{ext}")
                yield _item(id_, rel, caption, path=str(full), data=sample[ext])
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar fails this shard, not the run
            yield _item(f"{id_prefix}_{stem}", error=f"unreadable_shard: {shard}: {type(e).__name__}: {e}")


def iter_items(source: Mapping[str, Any]) -> Iterator[dict]:
    """Items of the configured source (``cfg.source``)."""
    kind = source["kind"]
    if kind == "img2dataset":
        return read_img2dataset(source["path"], source.get("image_root"),
                                id_prefix=source.get("id_prefix") or "wukong")
    if kind in ("tsv", "csv"):
        return read_pairs(source["path"], source.get("image_root") or str(Path(source["path"]).parent),
                          delimiter="\t" if kind == "tsv" else ",", id_prefix=source.get("id_prefix") or "img")
    if kind == "webdataset":
        if not source.get("image_root"):
            raise ValueError("source.kind=webdataset needs source.image_root: the folder its images are extracted into")
        return read_webdataset(source["path"], source["image_root"], id_prefix=source.get("id_prefix") or "wds")
    raise ValueError(f"unknown source kind {kind!r}; expected img2dataset, tsv, csv or webdataset")


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
    declared = (int(item.get("declared_width") or 0), int(item.get("declared_height") or 0))
    if all(declared) and declared != (w, h):
        out["error"] = f"size_mismatch: metadata says {declared[0]}x{declared[1]}, the image is {w}x{h}"
        return out
    if max(w, h) / max(1, min(w, h)) > max_aspect:
        out["error"] = f"aspect_ratio: {max(w, h) / max(1, min(w, h)):.1f} > {max_aspect:g}"
        return out
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC)
    out["pixels"] = np.asarray(img, dtype=np.uint8)
    return out
