"""Checkpoints: atomic, rotated DeepSpeed checkpoints for resume + the exported ``adapter.safetensors``.

Layout under ``<output_dir>``::

    checkpoints/step_00000010/   DeepSpeed files (frozen parameters excluded) + gill_state.json
    checkpoints/latest           name of the newest complete checkpoint
    adapter.safetensors          every trainable in fp32, the resolved config in the metadata

A checkpoint is written into ``checkpoints/.tmp/`` on all ranks, fsynced, and renamed into place by
rank 0 only after every rank finished; ``gill_state.json`` is written last, so a directory without it
is never resumed from. A crash mid-save leaves the previous checkpoint as the latest complete one.

The marker records what resume depends on, so a mismatch is refused before any model is built:
the data layout (world size, micro-batch size), what defines the trainables (the adapter config,
``train.flat_params``, ``model.prompt_max_length``, plus a digest of the adapter's names and
shapes) and every file's size and CRC-32. ``train.resume=auto`` verifies the files and falls back
to the previous checkpoint when the newest is damaged (a disk that filled up, a copy cut short).

Trust: resume loads DeepSpeed's own (pickled) checkpoint files, which this framework wrote; what
users hand around is ``adapter.safetensors``, which is never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from gill.training import distributed

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


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (DeepSpeed closes its files without fsync) and the folders."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync_dir(d)


def _crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_manifest(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size", "crc32"}}`` of every file of a checkpoint but its marker."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER
    }


def damage(path: Path) -> str | None:
    """What is wrong with the files of the complete checkpoint ``path`` (naming the file), or None."""
    files = json.loads((path / MARKER).read_text(encoding="utf-8")).get("files")
    if files is None:  # a checkpoint written before the marker listed its files: only empty files show
        empty = [p for p in sorted(path.glob("*.pt")) if p.stat().st_size == 0]
        return f"{empty[0]} is empty" if empty else None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, {want['size']} were written"
        if _crc32(f) != want["crc32"]:
            return f"{f} does not match its CRC-32 (corrupted on disk)"
    return None


def trainables_spec(cfg) -> dict:
    """What defines the trainable tensors, as flat ``{dotted key: value}`` (``cfg``: the whole config):
    a checkpoint of another layout cannot be loaded into this model."""
    from omegaconf import OmegaConf

    def flatten(prefix: str, node) -> dict:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flatten(f"{prefix}.{key}", sub).items()}
        return {prefix: node}

    spec = flatten("model.adapter", OmegaConf.to_container(cfg.model.adapter, resolve=True))
    spec["model.prompt_max_length"] = int(cfg.model.prompt_max_length)
    spec["train.flat_params"] = bool(cfg.train.get("flat_params", True))
    return spec


def adapter_digest(adapter: torch.nn.Module) -> str:
    """SHA-256 of the adapter's tensor names and shapes (original names, flattened or not)."""
    h = hashlib.sha256()
    for name, t in sorted(adapter.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()


def resume_record(cfg, world_size: int) -> dict:
    """What a resume must match: the data position is a position in this rank's share of an epoch (same
    ranks and micro-batch size), and DeepSpeed's tensors fit only the same trainables."""
    return {"world_size": world_size, "micro_batch_size": int(cfg.train.micro_batch_size),
            "trainables": trainables_spec(cfg)}


def check_resumable(path: Path, expected: dict) -> None:
    """Refuse to resume ``path`` into a run whose marker-recorded settings differ, naming each key.

    ``expected``: :func:`resume_record` of this run. Runs on the config alone, before any model is built."""
    saved = CheckpointManager.marker(path)
    for key in ("world_size", "micro_batch_size"):
        if saved.get(key) != expected[key]:
            raise ValueError(
                f"cannot resume {path} exactly: it was written with {key}={saved.get(key)}, this run has "
                f"{key}={expected[key]}; resume with the same setting, or start a new run from adapter.safetensors"
            )
    if "trainables" not in saved:
        log.warning("%s records no trainable layout (an older checkpoint): not checked before loading", path)
        return
    mine, theirs = expected["trainables"], saved["trainables"]
    missing = object()
    diff = [f"{k}: checkpoint {theirs.get(k, missing)!r}, this run {mine.get(k, missing)!r}"
            for k in sorted(set(mine) | set(theirs)) if mine.get(k, missing) != theirs.get(k, missing)]
    if diff:
        diff = [d.replace(repr(missing), "(unset)") for d in diff]
        raise ValueError(
            f"cannot resume {path}: its trainables were defined differently ({'; '.join(diff)}); resume with the "
            "checkpoint's settings, or start a new run"
        )


def check_digest(path: Path, adapter: torch.nn.Module) -> None:
    """After the model is built, before DeepSpeed loads: the adapter's names and shapes match the checkpoint's
    (catches what the config cannot say, e.g. another frozen stack with other hidden sizes)."""
    saved = CheckpointManager.marker(path).get("trainables_digest")
    if saved is not None and saved != adapter_digest(adapter):
        raise ValueError(
            f"cannot resume {path}: the adapter's tensor names/shapes (trainables_digest) differ from the checkpoint's "
            "although the adapter config matches: another frozen stack (model.name / model.pretrained_path)?"
        )


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
        _fsync_tree(tmp_root / tag)  # on disk before the marker says "complete"
        distributed.barrier()
        final = self.root / tag
        if distributed.is_main():
            marker = {"step": step, **(layout or {}), "files": file_manifest(tmp_root / tag)}
            atomic_write_text(tmp_root / tag / MARKER, json.dumps(marker))
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
        """``resume``: None, "auto" (the newest complete checkpoint here whose files verify, or none) or a
        checkpoint directory (which must verify). Reads every file once (CRC-32): call on one rank."""
        if resume in (None, "", False):
            return None
        if resume == "auto":
            done = self.complete()
            for i, path in enumerate(reversed(done)):
                problem = damage(path)
                if problem is None:
                    return path
                older = done[-i - 2] if i + 1 < len(done) else None
                # Set aside (kept for inspection): rotation must never count it as a good checkpoint.
                aside = path.with_name(path.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                log.warning("train.resume=auto: checkpoint %s is damaged (%s), moved to %s; %s", path.name, problem,
                            aside.name, f"falling back to {older.name}" if older else "no older checkpoint")
            if done:
                raise RuntimeError(f"train.resume=auto: every checkpoint in {self.root} is damaged (see the warnings)")
            return None
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory")
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
        problem = damage(path)
        if problem is not None:
            raise ValueError(f"train.resume={resume} is damaged: {problem}")
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
    saved = adapter.state_dict().keys()  # persistent buffers only (the vocabulary norm is recomputed at load)
    for name, b in adapter.named_buffers():
        if name in saved:
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
