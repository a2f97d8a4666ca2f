"""The DeepSpeed config: a plain JSON file from ``ds_configs/`` with its "auto" values filled from ``train``.

HF Trainer's convention: the JSON may say ``"auto"`` for batch sizes, accumulation, clipping, lr,
weight decay and bf16, and the trainer fills them in. An explicit value that contradicts the train
config is refused with a message naming both, before any model is loaded.

Accumulation: every mode runs its own backward, so DeepSpeed sees ``len(modes) x grad_accum``
micro-steps per optimizer step; its ``train_batch_size`` counts those micro-steps too.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


class ConfigError(ValueError):
    """A contradiction or impossible value in the composed config."""


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _fill(ds: dict, key_path: str, value, source: str) -> None:
    """Set ``ds[key_path]`` if it is "auto" or absent; refuse a different explicit value."""
    *parents, key = key_path.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config sets {key_path}={current!r} but {source} gives {value!r}; "
            f"set it to \"auto\" in the JSON or change {source}"
        )


def load_ds_file(name: str) -> dict:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = DS_CONFIG_DIR / name
    if not path.exists():
        raise ConfigError(f"DeepSpeed config {name!r} not found (looked in {DS_CONFIG_DIR})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_ds_config(cfg, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed dict for ``cfg`` (the whole composed config) and ``world_size`` ranks."""
    train = cfg.train
    modes = list(train.modes)
    if not modes:
        raise ConfigError("train.modes is empty: nothing to train")
    unknown = set(modes) - {"captioning", "retrieval", "generation"}
    if unknown:
        raise ConfigError(f"train.modes has unknown modes {sorted(unknown)}")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"train.modes lists a mode twice: {modes}")
    for key in ("micro_batch_size", "grad_accum"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {train[key]}")
    if "retrieval" in modes and int(train.micro_batch_size) * world_size < 2:
        raise ConfigError("retrieval needs at least 2 samples across ranks per micro-batch for negatives")

    ds = load_ds_file(cfg.deepspeed.file)
    ds = _merge(ds, OmegaConf.to_container(cfg.deepspeed.overrides, resolve=True) or {})
    micro = int(train.micro_batch_size)
    gas = len(modes) * int(train.grad_accum)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", gas, "len(train.modes) x train.grad_accum")
    _fill(ds, "train_batch_size", micro * gas * world_size, "micro_batch_size x modes x grad_accum x world_size")
    _fill(ds, "gradient_clipping", float(train.grad_clip), "train.grad_clip")
    bf16 = resolve_precision(train.precision, on_gpu) == "bf16"
    _fill(ds, "bf16.enabled", bf16, "train.precision")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("fp16 is not supported: the Kolors VAE gives NaN in fp16; use bf16")
    if "optimizer" in ds:
        _fill(ds, "optimizer.params.lr", float(train.lr), "train.lr")
        _fill(ds, "optimizer.params.weight_decay", float(train.weight_decay), "train.weight_decay")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if offload and not on_gpu:
        # No pinned memory without CUDA.
        ds["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    return ds
