"""Load a trained ``adapter.safetensors`` back into a ready-to-use :class:`~gill.models.model.GillModel`.

The artifact (written by the trainer, ``gill.training.checkpoint.export_adapter``) is a plain safetensors
file: every adapter tensor in fp32, plus string metadata ``format`` (``gill-adapter-v1``), ``step``
and ``config`` (the whole resolved Hydra config as JSON). The ``model`` group inside that config is
all that is needed to rebuild the frozen stack and an adapter of the right shape, so the file is
self-describing; a user on another machine only overrides paths (``pretrained_path`` ...).

Nothing here unpickles anything: safetensors holds raw tensors and JSON.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FORMAT = "gill-adapter-v1"


def read_metadata(adapter_path: str | os.PathLike) -> dict[str, str]:
    """The artifact's string metadata (format, step, config JSON), without reading the tensors."""
    with safe_open(str(adapter_path), framework="pt") as f:
        meta = f.metadata() or {}
    fmt = meta.get("format")
    if fmt != ADAPTER_FORMAT:
        raise ValueError(
            f"{adapter_path}: metadata format is {fmt!r}, expected {ADAPTER_FORMAT!r} "
            "(is this an adapter.safetensors exported by the gill trainer?)"
        )
    if "config" not in meta:
        raise ValueError(f"{adapter_path}: metadata has no 'config' (the resolved training config)")
    return meta


def model_config(adapter_path: str | os.PathLike, overrides: dict | None = None) -> DictConfig:
    """The ``model`` config group stored in the artifact, with ``overrides`` applied.

    Override keys are model keys, dotted for nesting (``{"pretrained_path": ..., "adapter.spatial.box_mask":
    False}``); a leading ``model.`` is accepted too, so Hydra-style keys copied from a launch line work.
    """
    full = json.loads(read_metadata(adapter_path)["config"])
    if "model" not in full:
        raise ValueError(f"{adapter_path}: the stored config has no 'model' group (keys: {sorted(full)})")
    cfg = OmegaConf.create(full["model"])
    for key, value in (overrides or {}).items():
        key = key[len("model."):] if key.startswith("model.") else key
        OmegaConf.update(cfg, key, value, force_add=True)
    # Inference never backpropagates: checkpointing would only slow the frozen stack down.
    OmegaConf.update(cfg, "gradient_checkpointing", {"unet": False, "text_encoder": False}, force_add=True)
    return cfg


def save_adapter(adapter: torch.nn.Module, path: str | os.PathLike, config: dict, step: int = 0) -> None:
    """Write ``adapter`` following the artifact contract (single process; the trainer has its own
    collective, ZeRO-aware writer). ``config`` is the full resolved config with a ``model`` key."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    meta = {"config": json.dumps(config, ensure_ascii=False), "format": ADAPTER_FORMAT, "step": str(step)}
    save_file(state, str(path), metadata=meta)


def load_adapter_state(adapter: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Load ``state`` into ``adapter`` strictly, naming every missing, unexpected or mis-shaped key."""
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise RuntimeError(
            f"{source} does not match the adapter built from its config — " + "; ".join(parts)
            + ". Was the file written with a different adapter config or code version?"
        )
    adapter.load_state_dict(state, strict=True)


def load_trained(
    adapter_path: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Rebuild the frozen stack + adapter described by ``adapter_path`` and load the trained weights.

    ``device`` defaults to CUDA when available; ``dtype`` to the config's (``auto``: bf16 on CUDA,
    fp32 on CPU). The adapter is cast to the stack's dtype, since its hooks run inside the UNet.
    Returns a :class:`~gill.models.model.GillModel` in eval mode.
    """
    from gill.models.model import GillModel
    from gill.models.stack import load_stack

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = model_config(adapter_path, overrides)
    stack = load_stack(cfg, device=device, dtype=dtype)
    model = GillModel(stack, cfg)
    load_adapter_state(model.adapter, load_file(str(adapter_path)), source=str(adapter_path))
    model.adapter.to(device=device, dtype=model.dtype)
    model.eval()
    model.requires_grad_(False)
    return model
