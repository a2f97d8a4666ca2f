"""``python -m gill.data.check data.path=layout.jsonl [data.image_root=DIR] [data.bbox_unit=norm]``.

Validates a layout JSONL (DESIGN §7) before hours of training find its problems one by one:

* every line is UTF-8 JSON that matches the shipped JSON Schema of a record
  (``gill/data/schemas/layout_record.schema.json``, also :func:`record_schema`);
* everything :class:`gill.data.layout.LayoutDataset` rejects or drops (image missing or outside the
  root, duplicate id, boxes out of range or inverted, box units that cannot be right);
* every image opens, and its size is the record's declared ``width`` x ``height``.

Prints the counts per reason and the first examples of each, and exits non-zero when any record is bad
or any object would be dropped (``--warn-only`` style leniency is deliberately absent: fix the file, or
filter it and check again).
"""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

SCHEMA_FILE = "layout_record.schema.json"
EXAMPLES = 3


def record_schema() -> dict:
    """The JSON Schema of one layout record, as shipped in the package."""
    return json.loads(resources.files("gill.data").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8"))


def _schema_reason(error) -> str:
    where = ".".join("*" if isinstance(p, int) else str(p) for p in error.absolute_path) or "record"
    return f"schema:{where}:{error.validator}"


def schema_problems(path: Path) -> dict[int, tuple[str | None, list[str]]]:
    """``line number -> (id, schema reasons)`` for the lines that are JSON but do not match the schema."""
    import jsonschema

    from gill.data.layout import _Skip, decode_line

    validator = jsonschema.Draft202012Validator(record_schema())
    problems: dict[int, tuple[str | None, list[str]]] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(decode_line(raw, first=line_no == 1))
            except (_Skip, ValueError):
                continue  # encoding and JSON errors are the loader's to report
            reasons = sorted({_schema_reason(e) for e in validator.iter_errors(record)})
            if reasons:
                rid = record.get("id") if isinstance(record, dict) else None
                problems[line_no] = (rid if isinstance(rid, str) else None, reasons)
    return problems


def size_problems(dataset) -> list[tuple[int, str, str]]:
    """``(line, id, reason)`` for kept records whose image does not open or is not the declared size.
    Reads image headers only (PIL opens lazily), so a large set checks quickly."""
    from PIL import Image

    out = []
    for rec in dataset.records:
        try:
            with Image.open(rec["image"]) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - any failure to open is one reason
            out.append((rec["line_no"], rec["id"], "undecodable_image"))
            continue
        if tuple(size) != tuple(rec["size"]):
            out.append((rec["line_no"], rec["id"], "size_mismatch"))
    return out


def check(path: str | Path, image_root: str | Path | None = None, bbox_unit: str = "norm") -> dict:
    """Check a layout JSONL; returns the report (also what :func:`main` prints)."""
    from gill.data.layout import LayoutDataset

    path = Path(path)
    image_root = Path(image_root) if image_root else path.parent
    logging.getLogger("gill.data.layout").setLevel(logging.ERROR)  # the report lists them instead
    ds = LayoutDataset(path, image_root, resolution=64, random_flip=0.0, bbox_unit=bbox_unit)
    bad: dict[int, set[str]] = defaultdict(set)
    ids: dict[int, str | None] = {}
    for line_no, rid, reason in ds.skipped_records:
        bad[line_no].add(reason)
        ids[line_no] = rid
    for line_no, (rid, reasons) in schema_problems(path).items():
        bad[line_no].update(reasons)
        ids.setdefault(line_no, rid)
    for line_no, rid, reason in size_problems(ds):
        bad[line_no].add(reason)
        ids[line_no] = rid
    by_reason: Counter = Counter(r for reasons in bad.values() for r in reasons)
    examples: dict[str, list[str]] = defaultdict(list)
    for line_no in sorted(bad):
        for reason in sorted(bad[line_no]):
            if len(examples[reason]) < EXAMPLES:
                examples[reason].append(f"line {line_no} (id={ids.get(line_no)})")
    n_lines = sum(1 for raw in open(path, "rb") if raw.strip())
    report = {"path": str(path), "image_root": str(image_root), "records": n_lines,
              "bad_records": len(bad), "good_records": n_lines - len(bad),
              "bad_by_reason": dict(sorted(by_reason.items())),
              "dropped_objects": dict(sorted(ds.dropped_objects.items())),
              "notices": dict(sorted(ds.notices.items())), "examples": dict(examples)}
    report["ok"] = n_lines > 0 and not bad and not ds.dropped_objects
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['path']} (images under {r['image_root']})",
             f"  records {r['records']}: good {r['good_records']}, bad {r['bad_records']}"]
    lines += [f"  bad: {k}: {v}   e.g. {', '.join(r['examples'].get(k, []))}" for k, v in r["bad_by_reason"].items()]
    lines += [f"  dropped object: {k}: {v}" for k, v in r["dropped_objects"].items()]
    lines += [f"  note: {k}: {v}" for k, v in r["notices"].items()]
    lines.append("OK" if r["ok"] else "FAILED: no records" if not r["records"] else
                 "FAILED: fix or filter the records above")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except Exception as e:  # noqa: BLE001 - a usage error, not a crash
        raise SystemExit(f"usage: python -m gill.data.check data.path=FILE [data.image_root=DIR] ({e})")
    data = cfg.get("data") or {}
    if not data.get("path"):
        raise SystemExit("usage: python -m gill.data.check data.path=FILE [data.image_root=DIR] "
                         "[data.bbox_unit=norm|1000|pixel|xywh_pixel]")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    data = _parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(str(data["path"])).is_file():
        raise SystemExit(f"data.path={data['path']}: no such file")
    report = check(data["path"], data.get("image_root"), str(data.get("bbox_unit") or "norm"))
    print(format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
