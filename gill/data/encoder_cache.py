"""The encoder cache on disk: per record, the frozen VAE's posterior and the CLIP tower's embedding
(and, with ``cache.prompts=true``, Kolors' ChatGLM encoding of the caption).

Built by ``python -m gill.tools.build_encoder_cache`` (:mod:`gill.tools.build_encoder_cache`) over the training data set *after* its
deterministic preprocessing; read back here by :class:`CachedLayoutDataset`, which yields the
cached tensors instead of the PIL image (captions, boxes, labels and sizes come from the cache too).
Training then samples ``mean + std * noise`` with the model's own checkpointed generator, so the
randomness is exactly that of a run from images; the VAE and the CLIP tower stay off the GPU.

Layout of ``cache.dir``::

    manifest.json               format, fingerprint, shard_size, num_items, shards {name: records,
                                skipped, bytes}, complete, skipped / source_skipped (reason -> count)
    shard_00000.safetensors     latent_mean [n, 4, h, w], latent_std [n, 4, h, w] (VAE dtype,
                                pre-scaling), image_embeds [n, Dv] (CLIP dtype); with prompts:
                                prompt_embeds [n, L, D] and prompt_pooled [n, D] (what
                                ``encode_prompt`` gives the generation mode: L = model.prompt_max_length,
                                2 MiB per record at Kolors' 256 x 4096 in bf16); metadata
                                "gill_cache" = JSON {"records": [...], "skipped": [...]}

Shard ``j`` holds the data set's items ``j * shard_size ... (j + 1) * shard_size - 1`` minus the
ones skipped (image that cannot be decoded), in order. The fingerprint pins everything that changes
the numbers (stack, VAE/CLIP configs and weight files, resolution, data source files and their
sizes/mtimes, dtype, preprocessing); :func:`open_cache` refuses a cache that does not match the
config or lacks records, before any model is loaded.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import torch

CACHE_FORMAT = "gill-encoder-cache-v1"
MANIFEST = "manifest.json"
META_KEY = "gill_cache"
PROMPT_TENSORS = ("prompt_embeds", "prompt_pooled")


class CacheError(RuntimeError):
    """The encoder cache cannot be built or used with this config (the message says why and what to do)."""


REBUILD = ("rebuild it with `python -m gill.tools.build_encoder_cache` and the same model=/data=/train.resolution=/train.precision "
           "overrides and cache.dir as this run (add cache.overwrite=true to replace a stale cache)")


def cache_enabled(cfg) -> bool:
    cache = cfg.get("cache") if hasattr(cfg, "get") else None
    return bool(cache and cache.get("dir"))


def shard_name(j: int) -> str:
    return f"shard_{j:05d}.safetensors"


# ---------------------------------------------------------------------------- fingerprint
def _sha256_file(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _stat(path: str | Path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _weights(folder: str | Path) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # .bin too: a vision tower may ship only pytorch_model.bin (read with weights_only=True)
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return [[p.name, *_stat(p)] for p in sorted(files)]


def describe_model(model_cfg) -> dict:
    """The stack's identity as far as the VAE and the CLIP tower go (no model is loaded)."""
    from gill.models.stack import resolve_stack_paths

    name = model_cfg.get("name")
    if name == "kolors_random":
        if model_cfg.get("seed") is None:
            raise CacheError("model=kolors_random with model.seed=null has random weights that differ per load: a "
                             "cache of its encoders' outputs would not belong to the model that trains. Set model.seed.")
        import torch

        # Seeded random weights are the same for the same seed, device type and torch version.
        return {"name": name, "seed": int(model_cfg.seed), "torch": torch.__version__}
    path, vision_path = resolve_stack_paths(model_cfg, build=False)
    path, vision_path = os.path.abspath(path), os.path.abspath(vision_path)
    return {
        "name": name,
        "path": path,
        "vae_config_sha256": _sha256_file(os.path.join(path, "vae", "config.json")),
        "vae_weights": _weights(os.path.join(path, "vae")),
        "vision_path": vision_path,
        "vision_config_sha256": _sha256_file(os.path.join(vision_path, "config.json")),
        "image_processor_sha256": _sha256_file(os.path.join(vision_path, "preprocessor_config.json")),
        "vision_weights": _weights(vision_path),
    }


def describe_prompts(model_cfg) -> dict:
    """What the cached prompt encodings are a function of besides :func:`describe_model`'s identity: ChatGLM's
    weights and tokenizer, the encoded length and the quantization the training run applies to ChatGLM."""
    quantize = model_cfg.get("quantize")
    out = {"max_length": int(model_cfg.prompt_max_length),
           "quantize": (quantize.get("text_encoder") if quantize else None)}
    if model_cfg.get("name") == "kolors_random":
        return out  # the seed in describe_model pins the weights; the tokenizer is the tiny stack's, fixed
    from gill.models.stack import resolve_stack_paths

    path, _ = resolve_stack_paths(model_cfg, build=False)
    path = os.path.abspath(path)
    tokenizer = Path(path, "tokenizer")
    return {
        **out,
        "text_encoder_config_sha256": _sha256_file(os.path.join(path, "text_encoder", "config.json")),
        "text_encoder_weights": _weights(os.path.join(path, "text_encoder")),
        "tokenizer_sha256": {p.name: _sha256_file(p) for p in sorted(tokenizer.iterdir()) if p.is_file()}
        if tokenizer.is_dir() else None,
    }


def prompts_enabled(cfg) -> bool:
    return bool(cache_enabled(cfg) and cfg.cache.get("prompts", False))


def describe_dataset(dataset) -> dict:
    """What the data set's items are a function of: its source files and preprocessing settings."""
    from gill.data.layout import LayoutDataset
    from gill.data.synthetic import SyntheticLayoutDataset

    if isinstance(dataset, SyntheticLayoutDataset):
        keys = ("num_samples", "resolution", "seed", "min_objects", "max_objects", "split", "min_size", "max_size")
        return {"kind": "synthetic", **{k: getattr(dataset, k) for k in keys}}
    if isinstance(dataset, LayoutDataset):
        digest = hashlib.sha256()
        for r in dataset.records:  # one stat per image, as the data set's own construction does
            digest.update(json.dumps([r["id"], str(r["image"]), *_stat(r["image"])]).encode())
        t = dataset.transform
        return {
            "kind": "layout",
            "path": str(dataset.path.resolve()),
            "jsonl_size_mtime": _stat(dataset.path),
            "image_root": str(dataset.image_root),
            "records": len(dataset.records),
            "images_size_mtime_sha256": digest.hexdigest(),
            "resolution": t.resolution,
            "center_crop": t.center_crop,
            "random_flip": t.random_flip,
            "max_objects": dataset.max_objects,
            "bbox_unit": dataset.bbox_unit,
        }
    raise CacheError(f"the encoder cache supports data=synthetic and data=layout, not {type(dataset).__name__}")


def check_cacheable(dataset) -> None:
    """Refuse random augmentations: a cache would freeze one draw of them for every epoch."""
    is_random = getattr(dataset, "is_random", None)
    if is_random is not None and is_random():
        t = dataset.transform
        raise CacheError(
            f"the data set has random augmentations (data.random_flip={t.random_flip}, "
            f"data.center_crop={t.center_crop}) and cached encoder outputs cannot follow them: set "
            "data.random_flip=0 data.center_crop=true (for the cache build and for training), or train "
            "without the cache (cache.dir=null)"
        )


def stack_dtype_name(cfg, on_gpu: bool) -> str:
    """The frozen stack's dtype in training (``build_engine``: bf16 iff the run is bf16)."""
    from gill.training.ds_config import resolve_precision

    return resolve_precision(cfg.train.precision, on_gpu)


def fingerprint(cfg, dataset, on_gpu: bool) -> dict:
    fp = {
        "format": CACHE_FORMAT,
        "model": describe_model(cfg.model),
        "resolution": int(cfg.train.resolution),
        "dtype": stack_dtype_name(cfg, on_gpu),
        "data": describe_dataset(dataset),
    }
    if prompts_enabled(cfg):
        fp["prompts"] = describe_prompts(cfg.model)
    return fp


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_fingerprints(cached: dict, current: dict) -> list[str]:
    """``["resolution: cache 64, config 128", ...]`` for every differing leaf."""
    a, b = _flatten(cached), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            hint = " (an image file's size or mtime changed)" if key.endswith("images_size_mtime_sha256") else ""
            out.append(f"{key}: cache {_short(a.get(key))}, config {_short(b.get(key))}{hint}")
    return out


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 120 else s[:117] + "..."


# ---------------------------------------------------------------------------- manifest
def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Atomically: temp file, fsync, rename, fsync the folder."""
    from gill.training.checkpoint import atomic_write_text

    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True))


def read_shard_meta(path: str | Path) -> dict:
    """The shard's record list, from the safetensors header only (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[META_KEY])


def dataset_ids(dataset) -> list[str] | None:
    records = getattr(dataset, "records", None)
    return [r["id"] for r in records] if records is not None else None


# ---------------------------------------------------------------------------- reading
def open_cache(cfg, dataset, on_gpu: bool) -> "CachedLayoutDataset":
    """The cached view of ``dataset`` (built from ``cfg.data``), after checking that the cache at
    ``cfg.cache.dir`` matches the config and covers every record. Raises :class:`CacheError`."""
    root = Path(cfg.cache.dir).expanduser()
    check_cacheable(dataset)
    manifest = read_manifest(root)
    if manifest is None:
        raise CacheError(f"cache.dir={root}: no encoder cache there ({MANIFEST} missing); build it with "
                         "`python -m gill.tools.build_encoder_cache` and the same model/data/train overrides as this run")
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"cache.dir={root}: format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}; {REBUILD}")
    current = fingerprint(cfg, dataset, on_gpu)
    cached_fp = dict(manifest["fingerprint"])
    if "prompts" not in current:  # a cache with prompt encodings serves a run that encodes its prompts itself
        cached_fp.pop("prompts", None)
    diffs = diff_fingerprints(cached_fp, current)
    if diffs:
        raise CacheError(f"cache.dir={root} does not match this config:\n  " + "\n  ".join(diffs) + f"\n{REBUILD}")
    n_shards = -(-manifest["num_items"] // manifest["shard_size"])
    done = [shard_name(j) for j in range(n_shards) if shard_name(j) in manifest["shards"]]
    if not manifest.get("complete") or len(done) != n_shards:
        raise CacheError(f"cache.dir={root} is incomplete ({len(done)} of {n_shards} shards): finish it by re-running "
                         "`python -m gill.tools.build_encoder_cache` with the same overrides (it resumes)")
    cached = CachedLayoutDataset(root, manifest, prompts="prompts" in current)
    # Every record of the data set is in the cache or was skipped by it, once, under the same id.
    ids = dataset_ids(dataset)
    covered: dict[int, str] = {}
    for meta in cached.shard_metas():
        for rec in meta["records"] + meta["skipped"]:
            if rec["index"] in covered:
                raise CacheError(f"cache.dir={root}: record {rec['index']} appears twice; {REBUILD}")
            covered[rec["index"]] = rec["id"]
    missing = sorted(set(range(len(dataset))) - set(covered))
    extra = sorted(set(covered) - set(range(len(dataset))))
    wrong = [i for i, rid in covered.items() if ids is not None and i < len(ids) and ids[i] != rid]
    if missing or extra or wrong:
        raise CacheError(f"cache.dir={root} lacks records of the data set (missing {len(missing)}, e.g. {missing[:5]}; "
                         f"not in the data set {len(extra)}; different id {len(wrong)}); {REBUILD}")
    return cached


class CachedLayoutDataset:
    """The data set's items with ``latent_mean``, ``latent_std`` (``[4, h, w]``) and
    ``vision_features`` (``[Dv]``) instead of ``image``; every other key as the data set gives it.
    With ``prompts``, also the caption's ``prompt_embeds`` (``[L, D]``) and ``prompt_pooled`` (``[D]``).

    Tensors are read lazily from memory-mapped shards (a 1024² record is ~260 KiB in bf16), so the
    cache never has to fit in RAM; each DataLoader worker opens its own handles. Records the build
    skipped (undecodable images) are simply absent: no substitute item, no duplicate.
    """

    def __init__(self, root: str | Path, manifest: dict, prompts: bool = False):
        self.root = Path(root)
        self.manifest = manifest
        self.prompts = prompts
        n_shards = -(-manifest["num_items"] // manifest["shard_size"])
        self.shards = [shard_name(j) for j in range(n_shards)]
        counts = [manifest["shards"][s]["records"] for s in self.shards]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self._metas: dict[int, dict] = {}
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        for s in self.shards:
            path = self.root / s
            if not path.is_file() or path.stat().st_size != manifest["shards"][s]["bytes"]:
                raise CacheError(f"{path}: missing or of the wrong size; {REBUILD}")

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict:  # spawned DataLoader workers: file handles do not pickle
        return {**self.__dict__, "_handles": {}}

    def set_epoch(self, epoch: int) -> None:
        """Cached items do not change with the epoch (random augmentations are refused)."""

    def shard_metas(self):
        for j in range(len(self.shards)):
            yield self._meta(j)

    def _meta(self, j: int) -> dict:
        if j not in self._metas:
            self._metas[j] = read_shard_meta(self.root / self.shards[j])
        return self._metas[j]

    def _handle(self, j: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked DataLoader worker: its own file handles
            self._handles, self._pid = {}, os.getpid()
        if j not in self._handles:
            if len(self._handles) >= 8:
                self._handles.pop(next(iter(self._handles)))
            self._handles[j] = safe_open(str(self.root / self.shards[j]), framework="pt")
        return self._handles[j]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        j = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[j]
        rec = self._meta(j)["records"][row]
        f = self._handle(j)
        item = {
            "id": rec["id"],
            "caption": rec["caption"],
            "objects": [{"label": o["label"], "bbox": tuple(o["bbox"])} for o in rec["objects"]],
            "original_size": tuple(rec["original_size"]),
            "crop_top_left": tuple(rec["crop_top_left"]),
            "latent_mean": f.get_slice("latent_mean")[row],
            "latent_std": f.get_slice("latent_std")[row],
            "vision_features": f.get_slice("image_embeds")[row],
        }
        if self.prompts:
            item.update({k: f.get_slice(k)[row] for k in PROMPT_TENSORS})
        return item
