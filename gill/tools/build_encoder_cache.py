"""``python -m gill.tools.build_encoder_cache <hydra overrides>``: build the encoder cache (format: :mod:`gill.data.encoder_cache`).

Runs the frozen VAE encoder and the CLIP vision tower over the training data set, after the data
set's deterministic preprocessing, and writes per record the VAE posterior's ``mean`` / ``std``
(pre-scaling) and CLIP's ``image_embeds``; with ``cache.prompts=true`` also ChatGLM's encoding of the caption
(``encode_prompt``, as the generation mode computes it, with the run's ``model.quantize``). Same config tree as
training::

    python -m gill.tools.build_encoder_cache model=kolors model.pretrained_path=... model.vision_path=... \\
        data=layout data.path=data/layout.jsonl data.random_flip=0 train.resolution=1024 \\
        cache.dir=data/cache-1024 cache.batch_size=8

Batched on the GPU when there is one (bf16 there, fp32 on CPU, like the stack in training); only
the VAE and the CLIP tower are loaded (and ChatGLM with ``cache.prompts``). Crash-safe and resumable: each shard is
written to a temp file, fsynced and renamed, then the manifest is replaced atomically; a re-run skips the shards the
manifest lists and recomputes the rest (batches never cross a shard, so a resumed cache is the
same as an uninterrupted one). A record whose image cannot be decoded is skipped, its reason
counted (``manifest.json: skipped``); records the data set itself rejected are counted under
``source_skipped``.

Several ranks (``torchrun --nproc_per_node=3 -m gill.tools.build_encoder_cache ...`` or ``deepspeed --num_gpus=3 --module
gill.tools.build_encoder_cache ...``) split the shards round-robin, one GPU each; rank 0 alone writes the manifest: before
the build (checks, as one process) and after every rank finished. A shard that is on disk but not
listed (a kill between its rename and the manifest, or another rank's) is listed when it reads back
whole and carries this cache's fingerprint; otherwise it is rebuilt. The shards are the same bytes
whatever the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from gill.training import distributed

from gill.data.encoder_cache import (
    CACHE_FORMAT,
    META_KEY,
    REBUILD,
    CacheError,
    cache_enabled,
    check_cacheable,
    diff_fingerprints,
    fingerprint,
    read_manifest,
    read_shard_meta,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def _item(dataset, index: int) -> dict | None:
    """Item ``index`` exactly (no substitute for an undecodable image), or None."""
    item_at = getattr(dataset, "item_at", None)
    return item_at(index) if item_at is not None else dataset[index]


def _write_shard(path: Path, tensors: dict, meta: dict) -> int:
    """Temp file -> fsync -> rename -> fsync the folder. Returns the file's size."""
    from safetensors.torch import save_file

    from gill.training.checkpoint import _fsync_dir

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
    """Build (or finish) the cache at ``cfg.cache.dir``; returns the manifest. Collective when launched
    on several ranks (each builds every ``world``-th shard still to do).

    ``after_shard(j)`` runs after shard ``j`` is committed (tests use it to interrupt a build).
    """
    from gill.data.collate import build_dataset
    from gill.models.chatglm import encode_prompt
    from gill.models.model import clip_image_embeds, vae_posterior
    from gill.models.stack import load_frozen_encoders, load_text_encoder

    if not cache_enabled(cfg):
        raise CacheError("cache.dir is not set: pass cache.dir=<folder> (training reads the cache from there)")
    root = Path(cfg.cache.dir).expanduser()
    batch_size, shard_size = int(cfg.cache.batch_size), int(cfg.cache.shard_size)
    if batch_size < 1 or shard_size < 1:
        raise CacheError(f"cache.batch_size and cache.shard_size must be >= 1, got {batch_size}, {shard_size}")
    device = distributed.device_for_rank()
    on_gpu = device.type == "cuda"
    world = distributed.world_size()
    if world > 1:
        distributed.init(device)
    rank = distributed.rank()  # after init: RANK as the launcher set it

    dataset = build_dataset(cfg.data, int(cfg.train.resolution), int(cfg.train.seed))
    check_cacheable(dataset)
    fp = fingerprint(cfg, dataset, on_gpu)
    fp_id = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    n = len(dataset)

    # Rank 0 checks and (re)writes the manifest; every rank then works from its copy.
    manifest = _on_rank0(lambda: _prepare_manifest(cfg, root, dataset, fp, fp_id, shard_size, device))
    shard_size = manifest["shard_size"]
    n_shards = -(-n // shard_size)
    todo = [j for j in range(n_shards) if not _shard_done(root, manifest, j)]
    mine = todo[rank::world]
    log.info("encoder cache %s: %d items, %d shards of %d, %d to build (%d on rank %d of %d)",
             root, n, n_shards, shard_size, len(todo), len(mine), rank, world)
    if mine:
        dtype = torch.bfloat16 if fp["dtype"] == "bf16" else torch.float32
        vae, vision, processor = load_frozen_encoders(cfg.model, device=device, dtype=dtype)
        prompts = fp.get("prompts")
        if prompts:
            text_encoder, tokenizer = load_text_encoder(cfg.model, device=device, dtype=dtype)
    for j in mine:
        t0 = time.perf_counter()
        records, skipped, images, captions = [], [], [], []
        for i in range(j * shard_size, min(n, (j + 1) * shard_size)):
            item = _item(dataset, i)
            if item is None:
                rid = dataset.records[i]["id"] if hasattr(dataset, "records") else None
                skipped.append({"index": i, "id": rid, "reason": "undecodable_image"})
                continue
            records.append(_record(i, item))
            images.append(item["image"])
            captions.append(item["caption"])
        parts: dict[str, list[torch.Tensor]] = {}
        for b in range(0, len(images), batch_size):  # batches never cross a shard: resume-exact
            chunk = images[b : b + batch_size]
            mean, std = vae_posterior(vae, chunk)
            out = {"latent_mean": mean, "latent_std": std, "image_embeds": clip_image_embeds(vision, processor, chunk)}
            if prompts:
                out["prompt_embeds"], out["prompt_pooled"] = encode_prompt(
                    text_encoder, tokenizer, captions[b : b + batch_size], prompts["max_length"], device)
            for k, v in out.items():
                parts.setdefault(k, []).append(v.cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        meta = {"records": records, "skipped": skipped, "fingerprint": fp_id}
        size = _write_shard(root / shard_name(j), tensors, meta)
        if world == 1:  # with several ranks, rank 0 lists every rank's shards at the end
            manifest["shards"][shard_name(j)] = {"records": len(records), "skipped": len(skipped), "bytes": size}
            write_manifest(root, manifest)
        dt = time.perf_counter() - t0
        log.info("shard %d/%d: %d records, %d skipped, %.1f records/s", j + 1, n_shards, len(records),
                 len(skipped), len(records) / max(dt, 1e-9))
        if after_shard is not None:
            after_shard(j)

    distributed.barrier()
    return _on_rank0(lambda: _finish_manifest(root, manifest, n_shards, fp_id))


def _on_rank0(fn):
    """``fn()`` on rank 0, its result on every rank; a CacheError there is raised on every rank (no
    rank is left waiting in a collective)."""
    result: object = ""
    if distributed.is_main():
        try:
            result = fn()
        except CacheError as e:
            result = e
    result = distributed.broadcast_object(result)
    if isinstance(result, CacheError):
        raise result
    return result


def _prepare_manifest(cfg, root: Path, dataset, fp: dict, fp_id: str, shard_size: int, device) -> dict:
    """Rank 0: refuse a cache of another config (or replace it), start or resume the manifest."""
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
                    "source_skipped": dict(getattr(dataset, "skipped", {})),  # rejected at construction
                    "skipped": {}, "records": 0, "built_on": device.type, "torch": torch.__version__}
        write_manifest(root, manifest)
    elif manifest["shard_size"] != shard_size:
        log.warning("resuming with the cache's own shard_size=%d (cache.shard_size=%d ignored)",
                    manifest["shard_size"], shard_size)
    for tmp in root.glob("*.tmp"):  # a crash mid-write; never listed in the manifest
        tmp.unlink()
    n_shards = -(-len(dataset) // manifest["shard_size"])
    if _list_unlisted_shards(root, manifest, n_shards, fp_id):
        write_manifest(root, manifest)
    return manifest


def _list_unlisted_shards(root: Path, manifest: dict, n_shards: int, fp_id: str) -> int:
    """List the shards on disk that the manifest lacks, if whole and of this cache; returns how many.

    A shard file appears only by an atomic rename after fsync, so one that reads back is complete;
    the fingerprint in its metadata proves it was built for this cache. Anything else (garbage, an
    older format) stays unlisted and is rebuilt over.
    """
    listed = 0
    for j in range(n_shards):
        name, path = shard_name(j), root / shard_name(j)
        if name in manifest["shards"] or not path.is_file():
            continue
        try:
            meta = read_shard_meta(path)
        except Exception:  # noqa: BLE001 - unreadable means "build it again"
            continue
        if meta.get("fingerprint") != fp_id:
            continue
        manifest["shards"][name] = {"records": len(meta["records"]), "skipped": len(meta["skipped"]),
                                    "bytes": path.stat().st_size}
        listed += 1
    return listed


def _finish_manifest(root: Path, manifest: dict, n_shards: int, fp_id: str) -> dict:
    """Rank 0, after every rank finished: list the shards, total them, mark the cache complete."""
    _list_unlisted_shards(root, manifest, n_shards, fp_id)
    missing = [shard_name(j) for j in range(n_shards) if not _shard_done(root, manifest, j)]
    if missing:
        write_manifest(root, manifest)
        raise CacheError(f"shards missing after the build: {missing[:5]}; run the same command again to finish")
    # Totals from the shards themselves, so they are the same however many runs built them.
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
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s] rank {distributed.rank()} %(levelname)s %(name)s: %(message)s")
    cfg = compose_config(distributed.strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        manifest = build_cache(cfg)
    except CacheError as e:
        log.error("%s", e)
        return 2
    finally:
        distributed.shutdown()
    if distributed.is_main():
        summary = {k: manifest[k] for k in ("records", "skipped", "source_skipped", "num_items")}
        print(json.dumps({"cache": str(Path(cfg.cache.dir).expanduser()), **summary}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    distributed.exit_now(main())  # skip interpreter teardown once the group is left (see exit_now)


__all__ = ["build_cache", "compose_config", "main", "REBUILD"]
