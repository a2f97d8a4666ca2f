"""Grounding benchmark presets (``--preset cpu|gpu|ci``) and the keys that cache each stage
of a run under ``--work-dir`` (docs/grounding_benchmark.md).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
STANDIN_VERSION = "s4"  # bump when the stand-in recipe changes (invalidates cached stacks)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    resolution: int = 64
    pool: int = 2048  # train-split images for the stand-in's pretraining
    vae: str = "pixel"  # "pixel": the fixed pixel-space AutoencoderKL | "trained": train the tiny VAE
    vae_pool: int = 4  # the pixel VAE's downscale (4: a 16x16 latent at 64 px; 2: 32x32, ~4x the UNet's work)
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 1500
    unet_batch: int = 24
    unet_lr: float = 2e-3
    unet_high_noise: float = 0.5  # share of UNet pretraining timesteps drawn from the noisier half
    adapter_steps: int = 3000
    adapter_batch: int = 16
    adapter_lr: float = 1e-2  # tanh gates start at 0 and Adam moves them ~lr per step
    adapter_high_noise: float = 0.0  # share of the adapter's generation timesteps from the noisier half (0: uniform)
    adapter_outside: str = "null"  # cross: what a pixel in no box attends to (model.adapter.spatial.outside)
    caption_dropout: float = 0.5
    layout_dropout: float = 0.1
    cr_steps: int = 600  # captioning + retrieval trainer run (0: skip)
    cr_batch: int = 16
    cr_lr: float = 5e-3
    tv_steps: int = 3000  # text encoder + vision tower pretraining (0: keep the tiny stack's random ones)
    tv_batch: int = 32
    tv_lr: float = 2e-3
    tv_attr_weight: float = 1.0
    vision_width: int = 64  # the stand-in CLIP tower (see standin_vision_config)
    vision_layers: int = 3
    vision_patch: int = 8
    eval_layouts: int = 48
    eval_pairs: int = 64
    sample_steps: int = 20
    guidance: float = 3.0
    beta: float = 1.0
    # the guidance's unconditional branch: "empty" (empty caption + null layout: guides caption and layout together,
    # KolorsPipeline's and GLIGEN's default) | "caption" (the caption + null layout: guides the layout alone)
    negative: str = "empty"
    caption_beams: int = 1  # 1: greedy captions; more: gill.inference.captioning.beam_caption
    eval_split: str = "test"  # held-out split of the layouts and pairs ("val" for choosing sampler settings)
    inner_dim_self: int = 16  # the cross injection gets the inner width matching self's parameter count


PRESETS = {
    # the CI test's reduced run: must stay well under 4 minutes on one core
    "ci": Preset("ci", pool=512, unet_steps=400, unet_batch=16, adapter_steps=200, adapter_batch=8,
                 cr_steps=0, eval_layouts=16, sample_steps=10, tv_steps=300),
    # adapter lr 2e-3: with the relative mapper loss the global clip no longer shrinks every update, and 1e-2
    # overshot (3000 steps, cross mIoU: 1e-2 0.29, 5e-3 0.48, 2e-3 0.51; docs/grounding_benchmark.md)
    # adapter_high_noise 0.5 (half the adapter's timesteps from the noisier half): success 0.538 -> 0.570 at 3000 steps
    # (mIoU 0.511 -> 0.512); 6000 steps did not help (0.506). cr_steps 600 / 1500 / 3000: recall@1 t2i 0.859 / 0.891 /
    # 0.906, i2t 0.906 / 0.906 / 0.922, caption exact 0.234 / 0.203 / 0.203 (docs/grounding_benchmark.md)
    # 2026-11-30: a 128-wide, 4-layer tower pretrained 6000 x 64 (caption exact 0.203 -> 0.750, recall@1
    # 0.906 / 0.922 -> 0.984 / 0.984); negative "caption" (guidance on the layout alone): on the 2026-11-29
    # stand-in and cross adapter, mIoU 0.512 -> 0.571, success 0.570 -> 0.699 against "empty" (guidance 1.5 with
    # "empty": 0.468)
    # 2026-11-30, later: the tower pretrained 9000 steps instead of 6000 (held-out head caption exact 0.641 ->
    # 0.797; ~68 min on one thread); the UNet and the adapters retrained on it: cross mIoU 0.573 -> 0.570 (the
    # pixel VAE caps it at 0.745)
    # 2026-12-03: the pixel VAE pools 2x2 (a 32x32 latent at 64 px; closer to Kolors' latent cells per object than
    # 4x4): the measurement's ceiling 0.745 -> 0.886, cross mIoU 0.561 -> 0.756 (no adapter 0.069 -> 0.039); the
    # UNet stage ~34 min and the adapter ~0.8 s/step on two threads (docs/grounding_benchmark.md)
    "cpu": Preset("cpu", vae_pool=2, adapter_lr=2e-3, adapter_high_noise=0.5, cr_steps=3000, vision_width=128,
                  vision_layers=4, tv_steps=9000, tv_batch=64, negative="caption"),
    # "a larger tiny" for one H200. The tiny models leave the GPU launch-bound (2026-11-30: the 128-wide tower's
    # pretraining ran ~70 ms/step at batch 64 on an H200, ~5x one CPU thread), so it buys batch, pool and evaluation
    # size: 4x the UNet batch on 4x the pool, 2x the adapter and captioning batches, 128 layouts and 256 pairs. The
    # tower pretrains 6000 steps, not the cpu preset's 9000: ~7 min, so the stage fits one 10-minute device call (it
    # is cached on its own, so a second call continues after it). Not run end to end yet (~25 min of H200 time).
    "gpu": Preset("gpu", pool=8192, unet_steps=3000, unet_batch=96, tv_steps=6000, tv_batch=64, vision_width=128,
                  vision_layers=4, adapter_steps=3000, adapter_batch=32, adapter_lr=2e-3, adapter_high_noise=0.5,
                  cr_steps=3000, cr_batch=32, eval_layouts=128, eval_pairs=256, negative="caption"),
}


def _key(obj) -> str:
    """A short content hash for cache directory names: a changed stage definition gets a new directory."""
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


_TV_SUBDIRS = ("text_encoder", "image_encoder")  # what the text/vision stage writes into a stack directory
_TV_FIELDS = ("resolution", "pool", "vae", "vae_steps", "vae_batch", "vae_lr", "tv_steps", "tv_batch", "tv_lr",
              "tv_attr_weight", "vision_width", "vision_layers", "vision_patch")


def standin_key(p: Preset) -> str:
    """Hash of the preset fields the stand-in depends on (adapter/eval settings do not rebuild it)."""
    fields = (*_TV_FIELDS, "unet_steps", "unet_batch", "unet_lr", "unet_high_noise")
    key = {f: getattr(p, f) for f in sorted(fields)}
    if p.vae_pool != 4:  # only when set, so the stand-ins built before the field existed keep their key
        key["vae_pool"] = p.vae_pool
    return _key(key)


def text_vision_key(p: Preset) -> str:
    """Hash of what the pretrained text encoder and tower depend on (a trained VAE runs before them on
    the same random stream; the pixel VAE draws nothing from it, so its pooling is not part of the key),
    so a UNet-only change reuses them."""
    return _key({f: getattr(p, f) for f in sorted(_TV_FIELDS)})


# Part of the adapter stage's cache key: bump when the trainer's generation loss changes (v2: the
# mapper's relative MSE, gill.models.modes.relative_mse).
ADAPTER_LOSS_VERSION = "generation-loss-v2"


def apply_settings(p: Preset, settings: list[str]) -> Preset:
    """``Preset`` with ``key=value`` overrides of its fields (``--set``), each parsed as the field's type."""
    types = {f.name: f.type for f in dataclasses.fields(Preset)}
    changes = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in types or key == "name":
            raise ValueError(f"--set expects field=value with a Preset field other than name, got {item!r}")
        cast = {"int": int, "float": float, "str": str}[types[key] if isinstance(types[key], str) else types[key].__name__]
        changes[key] = cast(value)
    return dataclasses.replace(p, **changes)
