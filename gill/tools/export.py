"""``python -m gill.tools.export <checkpoint dir> [--out adapter.safetensors]``: a DeepSpeed checkpoint -> the adapter file.

Training already writes ``<run>/adapter.safetensors`` at every save. This command makes the same file
from any kept checkpoint (``<run>/checkpoints/step_00000010``), e.g. an earlier step that validated
better. DeepSpeed's own ``zero_to_fp32.py`` merges the ZeRO shards too, but the adapter trains as one
flat tensor (:mod:`gill.training.flat_params`), so its output holds a single ``adapter.flat``; this command
runs DeepSpeed's merge (``get_fp32_state_dict_from_zero_checkpoint``) and then splits the flat tensor
back into the adapter's real names and shapes, read from an adapter built on the meta device (nothing
allocated, no weights loaded). The output also accepts ``zero_to_fp32``'s ``.safetensors`` output as
input. Metadata (format, step, resolved config) is what training writes, so ``python -m
gill.inference --adapter`` loads the result unchanged.

Trust: a DeepSpeed checkpoint is pickled and is only loaded from a run folder this framework wrote;
what is handed around is the ``.safetensors`` this writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from gill.training.checkpoint import ADAPTER_FORMAT, MARKER

PREFIX = "adapter."


def _run_dir(checkpoint: Path) -> Path:
    # <run>/checkpoints/step_XXXXXXXX
    return checkpoint.resolve().parent.parent


def run_config(checkpoint: Path, config: str | os.PathLike | None = None) -> dict:
    """The run's resolved config (``<run>/config.yaml``, written by training next to ``checkpoints/``)."""
    path = Path(config) if config else _run_dir(checkpoint) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's config is needed to name the adapter's tensors; pass --config")
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - a resolver of the original run (e.g. ${now:}) is not available here
        return OmegaConf.to_container(cfg, resolve=False)


def _frozen_dims(model_cfg) -> tuple[torch.nn.Module, int, int]:
    """``(unet on meta, llm hidden size, vision projection dim)`` from the stack's config files only."""
    from gill.models.stack import build_random_modules, resolve_stack_paths

    if model_cfg.get("name") == "kolors_random":
        mods = build_random_modules("meta", torch.float32)
        return mods["unet"], mods["text_encoder"].config.hidden_size, mods["vision"].config.projection_dim
    from diffusers import UNet2DConditionModel

    path, vision_path = resolve_stack_paths(OmegaConf.create(model_cfg), build=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
    te = json.loads((Path(path) / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    vision = json.loads((Path(vision_path) / "config.json").read_text(encoding="utf-8"))
    return unet, int(te["hidden_size"]), int(vision["projection_dim"])


def adapter_skeleton(model_cfg: dict) -> torch.nn.Module:
    """The run's adapter on the meta device, flattened as in training: its slots name the flat tensor."""
    from gill.models.adapter import GillAdapter

    unet, llm_dim, vision_dim = _frozen_dims(model_cfg)
    m = OmegaConf.create(model_cfg)
    with torch.device("meta"):
        adapter = GillAdapter(m.adapter, llm_dim=llm_dim, vision_dim=vision_dim,
                              prompt_len=m.prompt_max_length, unet=unet)
    adapter.flatten()
    return adapter


def merged_state(source: Path) -> dict[str, torch.Tensor]:
    """fp32 tensors of the engine's module: DeepSpeed's merge of a checkpoint dir, or zero_to_fp32's file."""
    if source.is_file():
        if source.suffix != ".safetensors":
            raise ValueError(f"{source}: give a checkpoint directory or zero_to_fp32's .safetensors output "
                             "(pickled .bin files are not loaded)")
        return load_file(str(source))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                      config: str | os.PathLike | None = None) -> Path:
    """Write ``adapter.safetensors`` (real names, fp32, training's metadata) for ``checkpoint``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    cfg = run_config(checkpoint if checkpoint.is_dir() else checkpoint.parent, config)
    state = {k[len(PREFIX):]: v for k, v in merged_state(checkpoint).items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"{checkpoint}: no adapter tensors (names starting with {PREFIX!r})")
    skeleton = adapter_skeleton(cfg["model"])
    if "flat" in state:
        state = skeleton.flat_params.expand(state)
    expected = {n: tuple(s.shape) for n, s in skeleton.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(f"{checkpoint} does not match the run's adapter config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    marker = checkpoint / MARKER if checkpoint.is_dir() else None
    step = json.loads(marker.read_text())["step"] if marker and marker.is_file() else 0
    out = Path(out) if out else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "adapter.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in state.items()}
    save_file(tensors, str(out), metadata={"format": ADAPTER_FORMAT, "step": str(step), "config": json.dumps(cfg)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gill.tools.export", description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", help="<run>/checkpoints/step_XXXXXXXX, or zero_to_fp32's .safetensors output")
    p.add_argument("--out", help="default: adapter.safetensors inside the checkpoint directory")
    p.add_argument("--config", help="the run's config.yaml (default: <run>/config.yaml)")
    args = p.parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.out, args.config)
    print(json.dumps({"adapter": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
