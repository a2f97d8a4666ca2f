"""Annotation drivers: single process or Ray Data, resumable, append-safe (DESIGN §8).

``run_annotation(cfg)`` reads the source, skips ids already written by an earlier run, annotates the rest
and appends to two JSONL files — the layout records (DESIGN §7) and the errors — then prints and returns a
summary (counts per error reason and per filter, images/s).

Crash safety: lines are appended per batch, then flushed and fsync'ed. A kill can leave at most one partial
last line; on start each output file is cut back to its last newline before the done ids are read, so a
re-run never duplicates a record (its id is in a file) and never loses one (a record whose line was cut is
not done, and runs again).

Two drivers share :class:`gill.annotate.worker.AnnotateWorker`:

* ``ray.enabled=false`` — one process; images are decoded/resized in a thread pool one batch ahead of the
  model (the GPU machine here cannot carry Ray).
* ``ray.enabled=true`` — Ray Data: ``from_items`` → ``map(load_image)`` (CPU tasks: decoding and resizing
  stay off the GPU actors) → ``map_batches(AnnotateWorker, compute=ActorPoolStrategy(size=n),
  num_gpus=1 (0 on a cluster without GPUs), batch_size=...)``; :func:`plan_ray_actors` fits ``n`` to the
  cluster first; the driver streams results with ``iter_batches`` and writes them itself
  rather than ``write_json``, because only a single appending writer gives the resume guarantee above.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from gill.annotate.filters import FILTER_NAMES
from gill.annotate.sources import iter_items, load_image



# --------------------------------------------------------------------------- files

def output_paths(cfg: Mapping[str, Any]) -> tuple[Path, Path, Path]:
    out = Path(cfg["output"]["path"])
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    errors = Path(cfg["output"].get("errors") or out.with_name(f"{stem}.errors.jsonl"))
    summary = Path(cfg["output"].get("summary") or out.with_name(f"{stem}.summary.json"))
    return out, errors, summary


def repair_and_read_ids(path: Path) -> set[str]:
    """Cut a partial trailing line (left by a kill) and return the ids of the complete lines."""
    if not path.exists():
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    ids = set()
    for line in data.splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable line names no id: that record runs again
    return ids


class AppendWriter:
    """Appends whole lines and makes each batch durable before the next one starts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write_lines(self, lines: Iterable[str]) -> None:
        lines = list(lines)
        if not lines:
            return
        # one write call per batch: a kill mid-call leaves at most one partial (last) line
        self.f.write("".join(line + "\n" for line in lines))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- items

def pending_items(cfg: Mapping[str, Any], done: set[str], stats: Counter) -> list[dict]:
    items, seen = [], set()
    limit = cfg.get("limit")
    for item in iter_items(cfg["source"]):
        stats["items_read"] += 1
        if item["id"] in done:
            stats["skipped_done"] += 1
            continue
        if item["id"] in seen:
            stats["skipped_duplicate_id"] += 1
            continue
        seen.add(item["id"])
        # every item has every key so Ray infers one schema for the block
        items.append({"id": item["id"], "image": item.get("image", ""), "caption": item.get("caption", ""),
                      "error": item.get("error", ""), "path": item.get("path", "") or "",
                      "data": item.get("data", b"") or b"",
                      "declared_width": int(item.get("declared_width") or 0),
                      "declared_height": int(item.get("declared_height") or 0)})
        if limit and len(items) >= int(limit):
            break
    return items


def _load_kwargs(cfg: Mapping[str, Any], factor: int) -> dict:
    b = cfg["backend"]
    return {"factor": factor, "min_pixels": int(b["min_pixels"]), "max_pixels": int(b["max_pixels"]),
            "max_aspect": float(cfg.get("max_aspect", 200))}


def _backend_factor(cfg: Mapping[str, Any]) -> int:
    # Qwen3-VL uses 16-pixel patches; Qwen2/2.5-VL 14; merge 2 for all
    return 32 if cfg["backend"]["name"] == "qwen3vl" else 28


def _stack(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("id", "image", "caption", "error", "width", "height", "pixels")}


# --------------------------------------------------------------------------- drivers

def _run_local(cfg, items, worker_factory) -> Iterator[dict]:
    bs = int(cfg["batch_size"])
    kwargs = _load_kwargs(cfg, _backend_factor(cfg))
    worker = worker_factory()
    batches = [items[i:i + bs] for i in range(0, len(items), bs)]
    with ThreadPoolExecutor(max_workers=max(1, int(cfg.get("decode_workers", 4)))) as pool:
        def submit(batch):
            return [pool.submit(load_image, it, **kwargs) for it in batch]

        nxt = submit(batches[0]) if batches else None
        for k in range(len(batches)):
            rows = [f.result() for f in nxt]
            nxt = submit(batches[k + 1]) if k + 1 < len(batches) else None  # decode ahead of the model
            yield worker(_stack(rows))


class _RayLoad:
    """Ray Data row function (a plain callable keeps the kwargs picklable)."""

    def __init__(self, kwargs):
        self.kwargs = kwargs

    def __call__(self, row):
        return load_image(row, **self.kwargs)


def plan_ray_actors(rc: Mapping[str, Any], cluster: Mapping[str, float]) -> tuple[int, float, float]:
    """``(actors, GPUs per actor, CPUs per actor)`` that fit ``cluster`` (``ray.cluster_resources()``).

    ``num_gpus_per_actor: null`` takes a GPU per actor when the cluster has GPUs and none otherwise, so the
    same config runs on a laptop. The image-decoding tasks need ``num_cpus_per_task`` beside the actors,
    or the pipeline would wait forever. Fails when not even one actor fits; warns and starts fewer when
    only some do.
    """
    gpus, cpus = float(cluster.get("GPU", 0.0)), float(cluster.get("CPU", 0.0))
    per_gpu = rc.get("num_gpus_per_actor")
    per_gpu = (1.0 if gpus >= 1 else 0.0) if per_gpu is None else float(per_gpu)
    per_cpu, per_task = float(rc["num_cpus_per_actor"]), float(rc["num_cpus_per_task"])
    want = int(rc["num_actors"])
    fit = want
    if per_gpu > 0:
        fit = min(fit, int(gpus / per_gpu + 1e-9))
    if per_cpu > 0:
        fit = min(fit, int(max(cpus - per_task, 0.0) / per_cpu + 1e-9))
    elif per_task > cpus:
        fit = 0
    if fit < 1:
        raise RuntimeError(
            f"ray: no annotation actor fits the cluster ({cpus:g} CPU, {gpus:g} GPU): each actor needs "
            f"{per_gpu:g} GPU and {per_cpu:g} CPU, plus {per_task:g} CPU for image decoding. Set "
            "ray.num_gpus_per_actor=0 to run on CPU, lower ray.num_cpus_per_actor, or add machines")
    if fit < want:
        warnings.warn(f"ray: {want} actors requested but only {fit} fit the cluster ({cpus:g} CPU, {gpus:g} "
                      f"GPU; {per_gpu:g} GPU + {per_cpu:g} CPU each); starting {fit}", stacklevel=2)
    return fit, per_gpu, per_cpu


def _run_ray(cfg, items) -> Iterator[dict]:
    import ray
    from ray.data import ActorPoolStrategy

    from gill.annotate.worker import AnnotateWorker

    rc = cfg["ray"]
    started = False
    if not ray.is_initialized():
        init = dict(rc.get("init_kwargs") or {})
        if rc.get("address"):
            init["address"] = rc["address"]
        init.setdefault("include_dashboard", False)
        ray.init(**init)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver has its own bar
        bs = int(cfg["batch_size"])
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // bs, 200)) or 1)
        actors, per_gpu, per_cpu = plan_ray_actors(rc, ray.cluster_resources())
        ds = ds.map(_RayLoad(_load_kwargs(cfg, _backend_factor(cfg))), num_cpus=float(rc["num_cpus_per_task"]))
        ds = ds.map_batches(
            AnnotateWorker, fn_constructor_kwargs={"cfg": cfg}, batch_size=bs, batch_format="numpy",
            compute=ActorPoolStrategy(size=actors), num_gpus=per_gpu, num_cpus=per_cpu)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield {k: list(v) for k, v in batch.items()}
    finally:
        if started:
            ray.shutdown()


def check_model_path(cfg: Mapping[str, Any]) -> None:
    """Fail before any output file exists when the model directory is not there (hours later is too late)."""
    b = cfg["backend"]
    if b.get("model_path") is None:
        raise ValueError("backend.model_path is not set: give the local directory of the Qwen-VL checkpoint")
    path = Path(str(b["model_path"]))
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backend.model_path={path}: {'no config.json in that directory' if path.is_dir() else 'no such directory'}"
            "; download the checkpoint first (e.g. hf download Qwen/Qwen2-VL-7B-Instruct "
            "--local-dir checkpoints/Qwen2-VL-7B-Instruct); the annotator never fetches from the hub")


def run_annotation(cfg: Mapping[str, Any], worker_factory=None, print_summary: bool = True) -> dict:
    """Annotate ``cfg.source`` into ``cfg.output``; return the summary dict (also written as JSON)."""
    from gill.annotate.worker import AnnotateWorker

    cfg = _plain(cfg)
    t0 = time.perf_counter()
    if worker_factory is None:  # a given worker brings its own model
        check_model_path(cfg)
    out_path, err_path, summary_path = output_paths(cfg)
    stats: Counter = Counter()
    done = repair_and_read_ids(out_path) | repair_and_read_ids(err_path)
    items = pending_items(cfg, done, stats)
    worker_factory = worker_factory or (lambda: AnnotateWorker(cfg))

    ok_w, err_w = AppendWriter(out_path), AppendWriter(err_path)
    reasons: Counter = Counter()
    filt: Counter = Counter({name: 0 for name in FILTER_NAMES})
    crash_after = (cfg.get("debug") or {}).get("crash_after_batches")
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", disable=not cfg.get("progress", True), dynamic_ncols=True)
        t_model = time.perf_counter()
        driver = _run_ray(cfg, items) if cfg["ray"]["enabled"] else _run_local(cfg, items, worker_factory)
        for n_batch, res in enumerate(driver):
            ok_lines, err_lines = [], []
            for kind, line, st in zip(res["kind"], res["line"], res["stats"]):
                (ok_lines if kind == "ok" else err_lines).append(line)
                if kind != "ok":
                    reasons[json.loads(line)["reason"]] += 1
                for k, v in json.loads(st).items():
                    (stats if k.startswith("objects") else filt)[k] += v
            if crash_after is not None and n_batch >= int(crash_after):
                _simulate_kill(ok_w, ok_lines)
            ok_w.write_lines(ok_lines)
            err_w.write_lines(err_lines)
            stats["written"] += len(ok_lines)
            stats["errors"] += len(err_lines)
            bar.update(len(res["kind"]))
        bar.close()
    finally:
        ok_w.close()
        err_w.close()
    elapsed = time.perf_counter() - t0
    processed = stats["written"] + stats["errors"]
    summary = {
        "output": str(out_path), "errors_file": str(err_path),
        "items_read": stats["items_read"], "skipped_done": stats["skipped_done"],
        "skipped_duplicate_id": stats["skipped_duplicate_id"], "processed": processed,
        "written": stats["written"], "errors": stats["errors"], "errors_by_reason": dict(sorted(reasons.items())),
        "filters": dict(filt), "objects_parsed": stats["objects_parsed"], "objects_kept": stats["objects_kept"],
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(processed / max(time.perf_counter() - t_model, 1e-9), 3) if processed else 0.0,
        "ray": bool(cfg["ray"]["enabled"]),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    if print_summary:
        print(format_summary(summary))
    return summary


def _simulate_kill(writer: AppendWriter, lines: list[str]) -> None:
    """Test hook (``debug.crash_after_batches``): die like ``kill -9`` in the middle of writing a line."""
    if lines:
        writer.f.write(lines[0][: len(lines[0]) // 2])
        writer.f.flush()
    os._exit(137)


def format_summary(s: Mapping[str, Any]) -> str:
    rows = [("items read", s["items_read"]), ("skipped (already done)", s["skipped_done"]),
            ("processed", s["processed"]), ("written", s["written"]), ("errors", s["errors"])]
    rows += [(f"  error: {k}", v) for k, v in s["errors_by_reason"].items()]
    rows += [(f"  filter: {k}", v) for k, v in s["filters"].items()]
    rows += [("objects parsed", s["objects_parsed"]), ("objects kept", s["objects_kept"]),
             ("elapsed s", s["elapsed_s"]), ("images/s", s["images_per_s"])]
    width = max(len(k) for k, _ in rows)
    return "annotation summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return json.loads(json.dumps(cfg))
