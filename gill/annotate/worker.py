"""The per-batch annotation worker: images + captions in, layout records and error records out.

One class serves both drivers: the single-process loop calls it directly, and Ray Data runs it as the
actor class of ``map_batches`` (its constructor loads the model once per actor, i.e. once per GPU).

Input batch columns (from :func:`gill.annotate.sources.load_image`): ``id``, ``image``, ``caption``,
``error``, ``width``, ``height`` (original image) and ``pixels`` (resized uint8 HxWx3).
Output columns, one row per input row: ``id``, ``kind`` (``"ok"`` | ``"error"``), ``line`` (the JSON line to
write, DESIGN §7 record or error record) and ``stats`` (JSON counters for the summary).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Mapping

import numpy as np

from gill.annotate.backends import make_backend
from gill.annotate.filters import FilterConfig, apply_filters
from gill.data.grounding import parse_grounding


def error_line(item: Mapping[str, Any], reason: str, **extra: Any) -> str:
    """JSON line of the errors file: ``reason`` is a short code, the text after ``:`` its detail."""
    code, _, detail = reason.partition(":")
    rec = {"id": str(item["id"]), "image": str(item.get("image") or ""), "caption": str(item.get("caption") or ""),
           "reason": code.strip(), "detail": detail.strip(), **extra}
    return json.dumps(rec, ensure_ascii=False)


class AnnotateWorker:
    def __init__(self, cfg: Mapping[str, Any], model: Any = None):
        self.backend = make_backend(cfg["backend"], cfg["prompts"], model=model)
        self.filters = FilterConfig.from_mapping(cfg.get("filters"))
        self.keep_raw = bool(cfg.get("output", {}).get("keep_raw_in_errors", True))
        self.retry_single = True  # benchmarks turn it off: a failing batch must fail loudly there

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        n = len(batch["id"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        out = {"id": [str(r["id"]) for r in rows], "kind": [""] * n, "line": [""] * n, "stats": ["{}"] * n}
        todo = []
        for i, r in enumerate(rows):
            if r["error"]:
                out["kind"][i], out["line"][i] = "error", error_line(r, str(r["error"]))
            else:
                todo.append(i)
        texts = self._generate([rows[i] for i in todo])
        for i, text in zip(todo, texts):
            out["kind"][i], out["line"][i], out["stats"][i] = self._record(rows[i], text)
        return out

    def _generate(self, rows: list[dict]) -> list[str | Exception]:
        if not rows:
            return []
        args = ([r["pixels"] for r in rows], [str(r["caption"]) for r in rows], [str(r["id"]) for r in rows])
        try:
            return self.backend.generate(*args)
        except Exception:  # noqa: BLE001 - isolate the record that breaks the batch
            if not self.retry_single:
                raise
            if len(rows) == 1:
                import traceback
                return [RuntimeError(traceback.format_exc(limit=2)[-300:])]
            return [t for r in rows for t in self._generate([r])]

    def _record(self, r: Mapping[str, Any], text: str | Exception) -> tuple[str, str, str]:
        if isinstance(text, Exception):
            return "error", error_line(r, f"generation_failed: {text}"), "{}"
        rh, rw = np.asarray(r["pixels"]).shape[:2]
        fw, fh = self.backend.frame(rw, rh)
        objects = parse_grounding(text, width=fw, height=fh, fmt=self.backend.fmt)
        counts: Counter = Counter(objects_parsed=len(objects))
        if not objects:
            raw = {"raw": text[:500]} if self.keep_raw else {}
            return "error", error_line(r, "no_boxes_parsed", **raw), json.dumps(counts)
        kept = apply_filters(objects, str(r["caption"]), self.filters, counts)
        counts["objects_kept"] = len(kept)
        if not kept:
            raw = {"raw": text[:500]} if self.keep_raw else {}
            return "error", error_line(r, "no_objects_after_filters", **raw), json.dumps(counts)
        rec = {"id": str(r["id"]), "image": str(r["image"]), "caption": str(r["caption"]),
               "width": int(r["width"]), "height": int(r["height"]),
               "objects": [o.to_dict() for o in kept], "annotator": self.backend.annotator}
        return "ok", json.dumps(rec, ensure_ascii=False), json.dumps(counts)
