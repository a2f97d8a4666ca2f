"""``python -m gill.cache <hydra overrides>``: build the encoder cache (format: :mod:`gill.data.cache`).

Runs the frozen VAE encoder and the CLIP vision tower over the training data set, after the data
set's deterministic preprocessing, and writes per record the VAE posterior's ``mean`` / ``std``
(pre-scaling) and CLIP's ``image_embeds``. Same config tree as training::

    python -m gill.cache model=kolors model.pretrained_path=... model.vision_path=... \\
        data=layout data.path=data/layout.jsonl data.random_flip=0 train.resolution=1024 \\
        cache.dir=data/cache-1024 cache.batch_size=8

Batched on the GPU when there is one (bf16 there, fp32 on CPU, like the stack in training); only
the VAE and the CLIP tower are loaded. Crash-safe and resumable: each shard is written to a temp
file, fsynced and renamed, then the manifest is replaced atomically; a re-run skips the shards the
manifest lists and recomputes the rest (batches never cross a shard, so a resumed cache is the
same as an uninterrupted one). A record whose image cannot be decoded is skipped, its reason
counted (``manifest.json: skipped``); records the data set itself rejected are counted under
``source_skipped``. One process (multi-rank building is not implemented).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from gill.data.cache import (
    CACHE_FORMAT,
    META_KEY,
    REBUILD,
    CacheError,
    cache_enabled,
    check_cacheable,
    diff_fingerprints,
    fingerprint,
    read_manifest,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def _item(dataset, index: int) -> dict | None:
    """Item ``index`` exactly (no substitute for an undecodable image), or None."""
    item_at = getattr(dataset, "item_at", None)
    return item_at(index) if item_at is not None else dataset[index]


def _write_shard(path: Path, tensors: dict, meta: dict) -> int:
    """Temp file -> fsync -> rename -> fsync the folder. Returns the file's size."""
    from safetensors.torch import save_file

    from gill.checkpoint import _fsync_dir

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, ensure_ascii=False)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path.stat().st_size


def _record(index: int, item: dict) -> dict:
    return {
        "index": index, "id": item["id"], "caption": item["caption"],
        "objects": [{"label": o["label"], "bbox": [float(v) for v in o["bbox"]]} for o in item["objects"]],
        "original_size": [int(v) for v in item["original_size"]],
        "crop_top_left": [int(v) for v in item["crop_top_left"]],
    }


def build_cache(cfg, *, after_shard=None) -> dict:
    """Build (or finish) the cache at ``cfg.cache.dir``; returns the manifest.

    ``after_shard(j)`` runs after shard ``j`` is committed (tests use it to interrupt a build).
    """
    from gill.data.collate import build_dataset
    from gill.model import clip_image_embeds, vae_posterior
    from gill.stack import load_frozen_encoders

    if not cache_enabled(cfg):
        raise CacheError("cache.dir is not set: pass cache.dir=<folder> (training reads the cache from there)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CacheError("python -m gill.cache runs as one process (multi-rank building is not implemented)")
    root = Path(cfg.cache.dir).expanduser()
    batch_size, shard_size = int(cfg.cache.batch_size), int(cfg.cache.shard_size)
    if batch_size < 1 or shard_size < 1:
        raise CacheError(f"cache.batch_size and cache.shard_size must be >= 1, got {batch_size}, {shard_size}")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")

    dataset = build_dataset(cfg.data, int(cfg.train.resolution), int(cfg.train.seed))
    source_skipped = dict(getattr(dataset, "skipped", {}))  # rejected at construction (bad JSON, paths, ...)
    check_cacheable(dataset)
    fp = fingerprint(cfg, dataset, on_gpu)

    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    if manifest is not None and (manifest.get("format") != CACHE_FORMAT or manifest["fingerprint"] != fp):
        diffs = diff_fingerprints(manifest.get("fingerprint", {}), fp)
        if not bool(cfg.cache.get("overwrite", False)):
            raise CacheError(f"cache.dir={root} holds a cache of another config:\n  " + "\n  ".join(diffs)
                             + "\npass cache.overwrite=true to replace it, or choose another cache.dir")
        log.warning("cache.overwrite=true: replacing the cache in %s (%s)", root, "; ".join(diffs))
        manifest = None
    if manifest is None:
        for old in root.glob("shard_*.safetensors*"):
            old.unlink()
        manifest = {"format": CACHE_FORMAT, "fingerprint": fp, "shard_size": shard_size,
                    "num_items": len(dataset), "shards": {}, "complete": False,
                    "source_skipped": source_skipped, "skipped": {}, "records": 0,
                    "built_on": device.type, "torch": torch.__version__}
        write_manifest(root, manifest)
    elif manifest["shard_size"] != shard_size:
        log.warning("resuming with the cache's own shard_size=%d (cache.shard_size=%d ignored)",
                    manifest["shard_size"], shard_size)
    shard_size = manifest["shard_size"]
    for tmp in root.glob("*.tmp"):  # a crash mid-write; never listed in the manifest
        tmp.unlink()

    n = len(dataset)
    n_shards = -(-n // shard_size)
    todo = [j for j in range(n_shards) if not _shard_done(root, manifest, j)]
    log.info("encoder cache %s: %d items, %d shards of %d, %d to build", root, n, n_shards, shard_size, len(todo))
    if todo:
        dtype = torch.bfloat16 if fp["dtype"] == "bf16" else torch.float32
        vae, vision, processor = load_frozen_encoders(cfg.model, device=device, dtype=dtype)
    for j in todo:
        t0 = time.perf_counter()
        records, skipped, images = [], [], []
        for i in range(j * shard_size, min(n, (j + 1) * shard_size)):
            item = _item(dataset, i)
            if item is None:
                rid = dataset.records[i]["id"] if hasattr(dataset, "records") else None
                skipped.append({"index": i, "id": rid, "reason": "undecodable_image"})
                continue
            records.append(_record(i, item))
            images.append(item["image"])
        parts: dict[str, list[torch.Tensor]] = {"latent_mean": [], "latent_std": [], "image_embeds": []}
        for b in range(0, len(images), batch_size):  # batches never cross a shard: resume-exact
            chunk = images[b : b + batch_size]
            mean, std = vae_posterior(vae, chunk)
            parts["latent_mean"].append(mean.cpu())
            parts["latent_std"].append(std.cpu())
            parts["image_embeds"].append(clip_image_embeds(vision, processor, chunk).cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        size = _write_shard(root / shard_name(j), tensors, {"records": records, "skipped": skipped})
        manifest["shards"][shard_name(j)] = {"records": len(records), "skipped": len(skipped), "bytes": size}
        write_manifest(root, manifest)
        dt = time.perf_counter() - t0
        log.info("shard %d/%d: %d records, %d skipped, %.1f records/s", j + 1, n_shards, len(records),
                 len(skipped), len(records) / max(dt, 1e-9))
        if after_shard is not None:
            after_shard(j)

    # Totals from the shards themselves, so they are the same however many runs built them.
    from gill.data.cache import read_shard_meta

    reasons: Counter = Counter()
    total = 0
    for j in range(n_shards):
        meta = read_shard_meta(root / shard_name(j))
        reasons.update(s["reason"] for s in meta["skipped"])
        total += len(meta["records"])
    manifest.update(complete=True, skipped=dict(sorted(reasons.items())), records=total)
    write_manifest(root, manifest)
    log.info("encoder cache complete: %d records, skipped %s, rejected by the data set %s",
             total, manifest["skipped"], manifest["source_skipped"])
    return manifest


def _shard_done(root: Path, manifest: dict, j: int) -> bool:
    entry = manifest["shards"].get(shard_name(j))
    path = root / shard_name(j)
    return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]


def compose_config(overrides: list[str]):
    """The training config tree (``conf/``) with Hydra overrides, without a Hydra run folder."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    cfg = compose_config(sys.argv[1:] if argv is None else argv)
    try:
        manifest = build_cache(cfg)
    except CacheError as e:
        log.error("%s", e)
        return 2
    summary = {k: manifest[k] for k in ("records", "skipped", "source_skipped", "num_items")}
    print(json.dumps({"cache": str(Path(cfg.cache.dir).expanduser()), **summary}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_cache", "compose_config", "main", "REBUILD"]
