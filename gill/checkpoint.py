"""Checkpoints: atomic, rotated DeepSpeed checkpoints for resume + the exported ``adapter.safetensors``.

Layout under ``<output_dir>``::

    checkpoints/step_00000010/   DeepSpeed files (frozen parameters excluded) + gill_state.json
    checkpoints/latest           name of the newest complete checkpoint
    adapter.safetensors          every trainable in fp32, the resolved config in the metadata

A checkpoint is written into ``checkpoints/.tmp/`` on all ranks and renamed into place by rank 0
only after every rank finished; ``gill_state.json`` is written last, so a directory without it is
never resumed from. A crash mid-save leaves the previous checkpoint as the latest complete one.

Trust: resume loads DeepSpeed's own (pickled) checkpoint files, which this framework wrote; what
users hand around is ``adapter.safetensors``, which is never unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from gill import distributed

log = logging.getLogger(__name__)
MARKER = "gill_state.json"
ADAPTER_FORMAT = "gill-adapter-v1"
_TAG = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, client_state: dict, layout: dict | None = None) -> Path:
        """Collective: every rank calls it with the same ``step``. ``layout`` (plain JSON, e.g. the
        world size) goes into the completion marker, readable before DeepSpeed loads anything."""
        tag = f"step_{step:08d}"
        tmp_root = self.root / ".tmp"
        if distributed.is_main():
            for stale in tmp_root.glob("step_*"):  # saves that crashed earlier
                shutil.rmtree(stale, ignore_errors=True)
            tmp_root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        engine.save_checkpoint(
            str(tmp_root), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        distributed.barrier()
        final = self.root / tag
        if distributed.is_main():
            atomic_write_text(tmp_root / tag / MARKER, json.dumps({"step": step, **(layout or {})}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp_root / tag, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", tag)
            self._rotate()
        distributed.barrier()
        return final

    def _rotate(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            (old / MARKER).unlink()  # first un-mark, so a crash mid-delete leaves no half "complete" one
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume) -> Path | None:
        """``resume``: None, "auto" (latest complete here, or none) or a checkpoint directory."""
        if resume in (None, "", False):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
        return path

    @staticmethod
    def marker(path: Path) -> dict:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))

    @staticmethod
    def load(engine, path: Path) -> dict:
        """Collective. Returns the client state saved with the checkpoint."""
        _, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        return client_state


def full_fp32_state(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable of ``adapter`` in fp32 — the optimizer's master copy where ZeRO keeps one.

    Collective under ZeRO (the master weights are partitioned across ranks): call on every rank.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in adapter.named_parameters():
        full = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
        state[name] = (full if full is not None else p.detach()).float().cpu().contiguous()
    for name, b in adapter.named_buffers():
        state[name] = b.detach().float().cpu().contiguous()
    flat = getattr(adapter, "flat_params", None)
    return flat.expand(state) if flat is not None else state


def export_adapter(adapter: torch.nn.Module, path: str | Path, config: dict, step: int) -> None:
    """Collective: write ``adapter.safetensors`` atomically (rank 0 writes)."""
    state = full_fp32_state(adapter)
    if not distributed.is_main():
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": ADAPTER_FORMAT, "step": str(step), "config": json.dumps(config)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # safetensors creates 0600; the artifact is meant to be shared
    os.replace(tmp, path)
    _fsync_dir(path.parent)
