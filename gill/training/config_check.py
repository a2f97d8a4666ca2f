"""Types and ranges of the ``train.*`` keys, checked before anything else runs.

A wrong value must fail at start-up naming its key, not minutes later as a numpy error deep in the
image transforms (``train.resolution=0``), a silent full epoch (``train.max_steps=0``) or a typo
that is ignored (``+train.mode_weights.genration=0`` used to leave generation at 1.0).
"""
from __future__ import annotations

import math
import numbers

from gill.training.ds_config import ConfigError

MODES = ("captioning", "retrieval", "generation")  # gill.models.model.MODES, without importing the model stack

# key -> (kind, minimum, nullable); kind "int" refuses floats and bools, "float" accepts ints.
_NUMBERS = {
    "lr": ("float", 0.0, False),
    "weight_decay": ("float", 0.0, False),
    "grad_clip": ("float", 0.0, False),
    "warmup_steps": ("int", 0, False),
    "max_steps": ("int", 1, True),
    "epochs": ("int", 1, False),
    "micro_batch_size": ("int", 1, False),
    "grad_accum": ("int", 1, False),
    "resolution": ("int", 8, False),
    "seed": ("int", 0, False),
    "save_every": ("int", 0, False),
    "keep_last": ("int", 1, False),
    "log_every": ("int", 1, False),
    "val_every": ("int", 0, False),
    "val_batches": ("int", 0, False),
    "val_captions": ("int", 0, False),
    "val_images": ("int", 0, False),
    "val_image_steps": ("int", 1, False),
    "val_recall_pairs": ("int", 1, False),
    "max_bad_steps": ("int", 1, False),
    "num_workers": ("int", 0, False),
    "gc_freeze_after": ("int", 0, False),
    "time_limit_min": ("float", 0.0, True),
    "gpu_memory_cap_gib": ("float", 0.0, True),
}


def _check_number(key: str, value, kind: str, minimum, nullable: bool) -> None:
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{key} must be set (got null)")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "int":
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(float(value)):
        raise ConfigError(f"{key} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value!r}")


def check_train_config(cfg) -> None:
    """Refuse impossible or misspelt ``train`` values, naming the key (``cfg``: the whole config)."""
    train = cfg.train
    for name, (kind, minimum, nullable) in _NUMBERS.items():
        if name in train:
            _check_number(f"train.{name}", train[name], kind, minimum, nullable)
    if train.resolution % 8:
        # The VAE downsamples by 8: another side would silently crop or fail inside the UNet.
        raise ConfigError(f"train.resolution must be a multiple of 8, got {train.resolution}")
    if train.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {train.lr_schedule!r}")
    weights = train.get("mode_weights") or {}
    unknown = sorted(set(weights) - set(MODES))
    if unknown:
        raise ConfigError(f"train.mode_weights has unknown modes {unknown} (known: {list(MODES)})")
    for mode, w in weights.items():
        _check_number(f"train.mode_weights.{mode}", w, "float", 0.0, False)
    resume = train.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"train.resume must be null, auto or a checkpoint path, got {resume!r}")
