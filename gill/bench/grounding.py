"""The synthetic grounding benchmark: does the spatial adapter put the requested shapes in their boxes?

    python -m gill.bench.grounding --preset cpu --injection both --out benchmarks/grounding.md

Three stages (docs/grounding_benchmark.md explains every choice):

(a) **Stand-in stack.** Kolors is frozen in this project, so the benchmark needs a frozen stack that
    can already draw the synthetic shapes from a caption. It is the tiny stack's directory (same
    layout, loaded by ``gill.models.stack.load_stack`` through ``model.pretrained_path``) with four parts
    replaced, with plain PyTorch loops here:
    ``text_encoder/`` + ``image_encoder/``  the tiny ChatGLM and a CLIP vision tower pretrained
              together (causal LM on captions and labels, image-conditioned LM through a soft prefix,
              CLIP-style contrastive, linear attribute read-outs; heads discarded), as ChatGLM3 and
              CLIP are pretrained in the real stack;
    ``vae/``  a fixed pixel-space AutoencoderKL (4x4 pooling / nearest upsampling, weights set by
              hand), its ``scaling_factor`` 1/std of the latents, as SD/SDXL chose theirs;
    ``unet/`` the tiny Kolors-architecture UNet trained for caption-conditioned denoising on the
              pretrained text encoder (epsilon objective, the stack's 1100-step noise schedule, half
              the timesteps from the noisier half, 10% empty captions for CFG).
    Captions say nothing about positions, so this stand-in knows *what* to draw but not *where*.
(b) **Adapter training** with the project's trainer, ``gill.training.recipe.run`` on a composed Hydra config
    (``train.modes=[generation]``, the stand-in as ``model.pretrained_path``), once per injection
    point, at equal parameter budgets. A second trainer run trains ``[captioning, retrieval]``.
(c) **Evaluation** on held-out layouts (the ``test`` split): ``gill.inference.generate_layout`` with
    the trained adapter (``beta``) and with it off (``beta=0``, same seeds), scored by the
    colour-threshold detector of :mod:`gill.bench.detector` (IoU per requested box, success = IoU
    > 0.5); retrieval recall@1 and greedy-caption exact match on held-out pairs.

Everything is seeded. Stages are cached under ``--work-dir`` by preset, seed and a hash of their
definition (``STANDIN_VERSION`` for code changes), so a re-run only evaluates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("gill.bench.grounding")

REPO = Path(__file__).resolve().parents[2]
STANDIN_VERSION = "s4"  # bump when the stand-in recipe changes (invalidates cached stacks)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    resolution: int = 64
    pool: int = 2048  # train-split images for the stand-in's pretraining
    vae: str = "pixel"  # "pixel": the fixed pixel-space AutoencoderKL | "trained": train the tiny VAE
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
    # session 4: a 128-wide, 4-layer tower pretrained 6000 x 64 (caption exact 0.203 -> 0.750, recall@1 0.906 / 0.922
    # -> 0.984 / 0.984); negative "caption" (guidance on the layout alone): on session 3's stand-in and cross adapter,
    # mIoU 0.512 -> 0.571, success 0.570 -> 0.699 against "empty" (guidance 1.5 with "empty": 0.468)
    # session 5: the tower pretrained 9000 steps instead of 6000 (held-out head caption exact 0.641 -> 0.797; ~68 min on
    # one thread); the UNet and the adapters retrained on it: cross mIoU 0.573 -> 0.570 (the pixel VAE caps it at 0.745)
    "cpu": Preset("cpu", adapter_lr=2e-3, adapter_high_noise=0.5, cr_steps=3000, vision_width=128, vision_layers=4,
                  tv_steps=9000, tv_batch=64, negative="caption"),
    # "a larger tiny" for one H200. The tiny models leave the GPU launch-bound (session 4: the 128-wide tower's
    # pretraining ran ~70 ms/step at batch 64 on an H200, ~5x one CPU thread), so it buys batch, pool and evaluation
    # size: 4x the UNet batch on 4x the pool, 2x the adapter and captioning batches, 128 layouts and 256 pairs. The
    # tower pretrains 6000 steps, not the cpu preset's 9000: ~7 min, so the stage fits one 10-minute device call (it
    # is cached on its own, so a second call continues after it). Not run end to end yet (~25 min of H200 time).
    "gpu": Preset("gpu", pool=8192, unet_steps=3000, unet_batch=96, tv_steps=6000, tv_batch=64, vision_width=128,
                  vision_layers=4, adapter_steps=3000, adapter_batch=32, adapter_lr=2e-3, adapter_high_noise=0.5,
                  cr_steps=3000, cr_batch=32, eval_layouts=128, eval_pairs=256, negative="caption"),
}


# =============================================================================================
# (a) the stand-in frozen stack
# =============================================================================================
def _images_tensor(items, device) -> torch.Tensor:
    arr = np.stack([np.asarray(it["image"].convert("RGB"), dtype=np.float32) for it in items])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).to(device)


# The fixed pixel-space "VAE": a real AutoencoderKL whose weights are set by hand so that
#   encode(x) = 4x4 average of the RGB pixels in latent channels 0-2 (channel 3 = 0, std 3e-7)
#   decode(z) = nearest-neighbour 4x upsampling of channels 0-2.
# Every ResnetBlock2D's conv2 and every attention's to_out are zero (identity through the residual),
# the stride-2 downsampling convs average 2x2, the upsampling convs pass through. The two GroupNorm +
# SiLU at the ends would destroy absolute colour, so each colour travels in a GroupNorm group of four
# channels [c, -c, K, -K]: the group's mean is exactly 0 and its std K/sqrt(2) (to 1e-4 for K=100),
# which the norm's weight undoes; its bias shifts by 20 so SiLU(x + 20) = x + 20 to 4e-8, and the
# following conv's bias takes the 20 back. Exact to 1e-4 in fp32 (tests check the round trip); not
# meant for bf16 (the K offsets need fp32 mantissa), so the benchmark runs the stand-in in fp32.
PIXEL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32), latent_channels=4,
    layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0, force_upcast=True,
)
_K, _SHIFT = 100.0, 20.0


@torch.no_grad()
def build_pixel_vae():
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D

    vae = AutoencoderKL(**PIXEL_VAE_CONFIG)
    for q in vae.parameters():
        q.zero_()

    def center(conv, taps, bias=None):
        k = conv.kernel_size[0] // 2
        for o, i, w in taps:
            conv.weight[o, i, k, k] = w
        for o, b in (bias or {}).items():
            conv.bias[o] = b

    for m in vae.modules():
        if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
            n = min(m.conv_shortcut.in_channels, m.conv_shortcut.out_channels)
            center(m.conv_shortcut, [(c, c, 1.0) for c in range(n)])
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.fill_(1.0)
    for blk in vae.encoder.down_blocks:
        for ds in blk.downsamplers or []:
            for c in range(ds.conv.out_channels):
                ds.conv.weight[c, c, :2, :2] = 0.25
    for blk in vae.decoder.up_blocks:
        for us in blk.upsamplers or []:
            center(us.conv, [(c, c, 1.0) for c in range(us.conv.out_channels)])
    groups = [(0, 0), (4, 1), (8, 2)]  # (first channel of a GroupNorm group, colour channel)
    split = [(g, c, 1.0) for g, c in groups] + [(g + 1, c, -1.0) for g, c in groups]
    consts = {**{g + 2: _K for g, _ in groups}, **{g + 3: -_K for g, _ in groups}}
    center(vae.encoder.conv_in, split, consts)
    center(vae.decoder.conv_in, split, consts)
    for norm, conv in ((vae.encoder.conv_norm_out, vae.encoder.conv_out), (vae.decoder.conv_norm_out, vae.decoder.conv_out)):
        for g, _ in groups:
            norm.weight[g] = _K / math.sqrt(2.0)
            norm.bias[g] = _SHIFT
        center(conv, [(c, g, 1.0) for g, c in groups], {c: -_SHIFT for _, c in groups})
    vae.encoder.conv_out.bias[4:] = -30.0  # log-variance at diffusers' clamp
    center(vae.quant_conv, [(c, c, 1.0) for c in range(8)])
    center(vae.post_quant_conv, [(c, c, 1.0) for c in range(4)])
    return vae.eval().requires_grad_(False)


def train_vae(vae, images: torch.Tensor, p: Preset, gen: torch.Generator, kl_weight: float = 1e-5) -> dict:
    """Reconstruction (MSE) + a small KL term, sampling the posterior as training will."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(p.vae_steps, warmup=min(50, p.vae_steps // 10)))
    t0, losses = time.perf_counter(), []
    for step in range(p.vae_steps):
        x = images[torch.randint(0, len(images), (p.vae_batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(x.device)
        rec = vae.decode(z).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(F.mse_loss(rec, x).item())
        if (step + 1) % max(1, p.vae_steps // 5) == 0:
            log.info("vae step %d/%d  recon mse %.4f", step + 1, p.vae_steps, statistics.mean(losses[-20:]))
    vae.eval().requires_grad_(False)
    return {"vae_recon_mse": statistics.mean(losses[-20:]), "vae_s": time.perf_counter() - t0}


def _warmup_cosine(total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for s in range(0, len(images), batch):
        d = vae.encode(images[s : s + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(stack, captions: list[str], max_length: int, batch: int = 64):
    from gill.models.chatglm import encode_prompt

    embeds, pooled = [], []
    for s in range(0, len(captions), batch):
        e, p = encode_prompt(stack.text_encoder, stack.tokenizer, captions[s : s + batch], max_length, stack.unet.device)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def train_unet(stack, latents_mean, latents_std, scale, prompt_embeds, pooled, p: Preset, gen, drop=0.1) -> dict:
    """Caption-conditioned denoising (epsilon objective) with the stack's own noise schedule."""
    unet, sched = stack.unet, stack.noise_scheduler
    unet.train().requires_grad_(True)
    dev = latents_mean.device
    empty_embeds, empty_pooled = encode_captions(stack, [""], prompt_embeds.shape[1])
    res = p.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=p.unet_lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(p.unet_steps, warmup=min(100, p.unet_steps // 10)))
    steps = sched.config.num_train_timesteps
    t0, losses = time.perf_counter(), []
    for step in range(p.unet_steps):
        idx = torch.randint(0, len(latents_mean), (p.unet_batch,), generator=gen).to(dev)
        eps = torch.randn(latents_mean[idx].shape, generator=gen).to(dev)
        z = (latents_mean[idx] + latents_std[idx] * eps) * scale
        noise = torch.randn(z.shape, generator=gen).to(dev)
        t = torch.randint(0, steps, (p.unet_batch,), generator=gen)
        # a share of the samples from the noisier half, where colours and layout are decided
        high = torch.rand(p.unet_batch, generator=gen) < p.unet_high_noise
        t = torch.where(high, steps // 2 + t // 2, t).to(dev)
        noisy = sched.add_noise(z, noise, t)
        keep = (torch.rand(p.unet_batch, generator=gen) >= drop).to(dev)
        ehs = torch.where(keep[:, None, None], prompt_embeds[idx], empty_embeds)
        pool = torch.where(keep[:, None], pooled[idx], empty_pooled)
        pred = unet(noisy, t, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(p.unet_batch, -1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, p.unet_steps // 5) == 0:
            log.info("unet step %d/%d  eps mse %.4f", step + 1, p.unet_steps, statistics.mean(losses[-50:]))
    unet.eval().requires_grad_(False)
    return {"unet_eps_mse": statistics.mean(losses[-50:]), "unet_s": time.perf_counter() - t0}


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
    return _key({f: getattr(p, f) for f in sorted(fields)})


def text_vision_key(p: Preset) -> str:
    """Hash of what the pretrained text encoder and tower depend on (the VAE stage runs before them on
    the same random stream), so a UNet-only change reuses them."""
    return _key({f: getattr(p, f) for f in sorted(_TV_FIELDS)})


def build_standin(work_dir: Path, p: Preset, device: torch.device, seed: int = 0) -> tuple[Path, dict]:
    """The stand-in frozen stack directory (built once per preset; returns it and build stats)."""
    from gill.data.synthetic import SyntheticLayoutDataset
    from gill.models.stack import ensure_tiny_stack, load_stack

    final = work_dir / f"standin-{p.name}-{STANDIN_VERSION}-{standin_key(p)}-seed{seed}"
    stats_file = final / "STANDIN.json"
    if stats_file.is_file():
        log.info("stand-in stack: reusing %s", final)
        return final, json.loads(stats_file.read_text())
    tmp = work_dir / (final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ensure_tiny_stack(), tmp)
    tv_cache = text_vision_cache(work_dir, p, seed)
    tv_cached = p.tv_steps > 0 and (tv_cache / "TV.json").is_file()
    if tv_cached:
        log.info("text encoder + vision tower: reusing %s", tv_cache)
        for sub in _TV_SUBDIRS:
            shutil.rmtree(tmp / sub)
            shutil.copytree(tv_cache / sub, tmp / sub)
    stack = load_stack({"name": "tiny", "pretrained_path": str(tmp), "dtype": "fp32"}, device=device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    data = SyntheticLayoutDataset(p.pool, p.resolution, seed=seed, split="train")
    items = [data[i] for i in range(p.pool)]
    images = _images_tensor(items, device)
    stats = {"pool": p.pool, "render_s": time.perf_counter() - t0}

    if p.vae == "pixel":
        stack.vae = build_pixel_vae().to(device)
        stats["vae_recon_mse"] = float(F.mse_loss(stack.vae.decode(stack.vae.encode(images[:256]).latent_dist.mean).sample,
                                                  images[:256]))
    elif p.vae == "trained":
        stats.update(train_vae(stack.vae, images, p, gen))
    else:
        raise ValueError(f"preset.vae must be 'pixel' or 'trained', got {p.vae!r}")
    if tv_cached:
        from safetensors.torch import load_file

        gen.set_state(load_file(str(tv_cache / "generator.safetensors"))["state"])
        stats.update(json.loads((tv_cache / "TV.json").read_text()))
    elif p.tv_steps > 0:
        tv_stats = build_text_vision(stack, tmp, p, gen, device, seed)
        save_text_vision_cache(tv_cache, tmp, tv_stats, gen)
        stats.update(tv_stats)
    mean, std = encode_pool(stack.vae, images)
    scale = float(1.0 / mean.std())
    stats.update({"vae": p.vae, "vae_scaling_factor": scale, "latent_posterior_std": float(std.mean())})
    stack.vae.register_to_config(scaling_factor=scale)
    shutil.rmtree(tmp / "vae")
    stack.vae.save_pretrained(tmp / "vae", safe_serialization=True)

    prompt_max_length = int(_tiny_model_cfg().prompt_max_length)
    embeds, pooled = encode_captions(stack, [it["caption"] for it in items], prompt_max_length)
    stats.update(train_unet(stack, mean, std, scale, embeds, pooled, p, gen))
    stack.unet.save_pretrained(tmp / "unet", safe_serialization=True)

    stats_file_tmp = tmp / "STANDIN.json"
    stats_file_tmp.write_text(json.dumps({**stats, "preset": dataclasses.asdict(p)}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final, json.loads(stats_file.read_text())


@torch.no_grad()
def colour_separation(stack) -> dict:
    """Does the text encoder's phrase vector (the pooled vector the spatial adapter reads) encode the
    colour and the shape of a label as shared features? Leave-one-out nearest centroid over the 32
    labels: a label's colour is predicted from the centroids of the *other* labels of each colour
    (cosine), likewise its shape. Chance: 1/8 and 1/4."""
    from gill.models.chatglm import encode_prompt
    from gill.data.vocab import COLORS, SHAPES

    labels = [(c, s) for c in COLORS for s in SHAPES]
    _, pooled = encode_prompt(stack.text_encoder, stack.tokenizer, [c + s for c, s in labels], 16,
                              next(stack.text_encoder.parameters()).device, padding="longest")
    v = F.normalize(pooled.float() - pooled.float().mean(0), dim=-1)
    out = {}
    for name, key, classes in (("colour", 0, list(COLORS)), ("shape", 1, list(SHAPES))):
        right = 0
        for i, lab in enumerate(labels):
            cents = torch.stack([v[[j for j, o in enumerate(labels) if o[key] == c and j != i]].mean(0) for c in classes])
            right += classes[int((F.normalize(cents, dim=-1) @ v[i]).argmax())] == lab[key]
        out[f"phrase_{name}_loo_acc"] = right / len(labels)
    return out


def text_encoder_checks(stack_dir: Path, device) -> dict:
    """:func:`colour_separation` of the stand-in's text encoder (loaded from its directory, as training
    loads it) and, for comparison, of the tiny stack's random one."""
    from gill.models.stack import ensure_tiny_stack, load_stack

    out = {}
    for name, path in (("standin", stack_dir), ("random", ensure_tiny_stack())):
        stack = load_stack({"name": "tiny", "pretrained_path": str(path), "dtype": "fp32"}, device=device)
        out[name] = colour_separation(stack)
    return out


def attach_vision_tower(stack, p: Preset, device, seed: int) -> None:
    """Give ``stack`` a fresh :func:`standin_vision_config` CLIP tower and a preprocessor at its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 3)
    cfg = standin_vision_config(p)
    stack.vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).to(device)
    size = cfg["image_size"]
    old = stack.image_processor
    stack.image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                               image_mean=old.image_mean, image_std=old.image_std)


def pretrain_text_vision_split(stack, p: Preset, gen, seed: int) -> dict:
    """:func:`pretrain_text_vision` on fresh train-split items, evaluated on 128 ``val`` images."""
    from gill.data.synthetic import SyntheticLayoutDataset

    val = SyntheticLayoutDataset(128, p.resolution, seed=seed, split="val")
    train = SyntheticLayoutDataset(p.tv_steps * p.tv_batch, p.resolution, seed=seed + 1, split="train")
    return pretrain_text_vision(stack, train, p, gen, [val[i] for i in range(len(val))])


def build_text_vision(stack, out: Path, p: Preset, gen, device, seed: int) -> dict:
    """Replace the stand-in's random ChatGLM and CLIP tower by pretrained ones (see
    :func:`pretrain_text_vision`) and save them into ``out`` in the real layout, loadable by
    ``from_pretrained``."""
    attach_vision_tower(stack, p, device, seed)
    stats = pretrain_text_vision_split(stack, p, gen, seed)
    for sub in _TV_SUBDIRS:
        shutil.rmtree(out / sub)
    stack.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    stack.vision.save_pretrained(out / "image_encoder", safe_serialization=True)
    stack.image_processor.save_pretrained(out / "image_encoder")
    return stats


def text_vision_cache(work_dir: Path, p: Preset, seed: int) -> Path:
    """Where :func:`build_text_vision`'s result is cached on its own (the slowest stage after the UNet):
    the saved folders, the stats and the generator's state afterwards, so that a stand-in built from
    the cache continues the same random stream and equals one built from scratch."""
    return work_dir / f"textvision-{STANDIN_VERSION}-{text_vision_key(p)}-seed{seed}"


def save_text_vision_cache(cache: Path, stack_dir: Path, stats: dict, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    tmp = cache.parent / (cache.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in _TV_SUBDIRS:
        shutil.copytree(stack_dir / sub, tmp / sub)
    save_file({"state": gen.get_state()}, str(tmp / "generator.safetensors"))
    (tmp / "TV.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def probe_text_vision(p: Preset, device, seed: int = 0) -> dict:
    """Only stage (a0), nothing saved: pretrain the text encoder and tower of this preset and report
    their held-out numbers (``--only text-vision``, for tuning the tower without building a UNet)."""
    from gill.models.stack import ensure_tiny_stack, load_stack

    stack = load_stack({"name": "tiny", "pretrained_path": ensure_tiny_stack(), "dtype": "fp32"}, device=device)
    attach_vision_tower(stack, p, device, seed)
    stats = pretrain_text_vision_split(stack, p, torch.Generator().manual_seed(seed), seed)
    stats["vision_params"] = sum(q.numel() for q in stack.vision.parameters())
    return {"preset": dataclasses.asdict(p), "text_vision": stats, "device": str(device)}


def _tiny_model_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")


# =============================================================================================
# (a0) the stand-in's text encoder and vision tower: pretrained, then frozen like ChatGLM3 / CLIP
# =============================================================================================
# The stand-in's CLIP vision tower. The tiny stack's (32 px input, width 32, 2 layers) cannot resolve
# three 6-14 px shapes after its 2x downsampling; the stand-in sees the images at their 64 px.
def standin_vision_config(p: Preset) -> dict:
    """``CLIPVisionConfig`` kwargs of the stand-in tower: the preset's width, depth and patch, 16-wide
    heads, a 2x MLP, the projection as wide as the tower, input at the images' own resolution."""
    w = p.vision_width
    return dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=p.vision_layers,
                num_attention_heads=max(1, w // 16), image_size=p.resolution, patch_size=p.vision_patch,
                projection_dim=w)


MAX_SLOTS = 3  # the synthetic data's most objects per image


def attribute_targets(item: dict) -> list[int]:
    """``[bg, colour_1, shape_1, ..., colour_3, shape_3]`` class ids in caption order (none = last id)."""
    from gill.data.synthetic import reading_order
    from gill.data.vocab import BACKGROUNDS, COLORS, SHAPES

    bg = item["caption"].split("背景")[0]
    out = [list(BACKGROUNDS).index(bg)]
    objects = reading_order(item["objects"])
    for j in range(MAX_SLOTS):
        if j < len(objects):
            lab = objects[j]["label"]
            out += [list(COLORS).index(lab[:2]), SHAPES.index(lab[2:])]
        else:
            out += [len(COLORS), len(SHAPES)]
    return out


def _attr_sizes() -> list[int]:
    from gill.data.vocab import BACKGROUNDS, COLORS, SHAPES

    return [len(BACKGROUNDS)] + [len(COLORS) + 1, len(SHAPES) + 1] * MAX_SLOTS


def _attr_loss(logits: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE over the attribute groups; also the fraction of rows with every group right."""
    loss, right, s = 0.0, torch.ones(len(targets), dtype=torch.bool, device=targets.device), 0
    for g, n in enumerate(sizes):
        lg = logits[:, s : s + n]
        loss = loss + F.cross_entropy(lg, targets[:, g])
        right &= lg.argmax(-1) == targets[:, g]
        s += n
    return loss, right.float().mean()


def _lm_batch(tokenizer, prefix_len: int, texts_ids: list[list[int]], device):
    """Left-padded ``[gMASK] sop`` + ``prefix_len`` slots + text + eos: ids (slots = 0), mask, labels,
    slot positions."""
    head = tokenizer.get_prefix_tokens()
    eos = tokenizer.eos_token_id
    seqs = [head + [-1] * prefix_len + t + [eos] for t in texts_ids]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, t) in enumerate(zip(seqs, texts_ids)):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
        labels[i, width - len(t) - 1:] = torch.tensor(t + [eos])
    slots = ids == -1
    return ids.clamp(min=0).to(device), mask.to(device), labels.to(device), slots.to(device)


def _run_lm(text_encoder, ids, mask, slots=None, slot_embeds=None):
    """(LM loss terms need) last hidden [B, S, H] and the pre-norm final hidden [B, S, H]."""
    from gill.models.chatglm import embed_tokens, run_chatglm

    emb = embed_tokens(text_encoder, ids)
    if slot_embeds is not None:
        emb = emb.masked_scatter(slots[..., None], slot_embeds.to(emb.dtype))
    last, hs = run_chatglm(text_encoder, emb, mask, output_hidden_states=True)
    return last, hs[-1].transpose(0, 1)


def _lm_loss(text_encoder, last, labels):
    from gill.models.chatglm import lm_logits

    tgt = labels[:, 1:]
    keep = tgt != -100
    logits = lm_logits(text_encoder, last[:, :-1][keep]).float()
    return F.cross_entropy(logits, tgt[keep]), (logits.argmax(-1) == tgt[keep]).float().mean()


def _fast_pixel_values(stack, items) -> torch.Tensor:
    """What the stand-in's CLIPImageProcessor gives for images already at its input size (its resize
    and crop are the identity there): rescale to [0, 1] and normalize, without PIL round trips."""
    x = _images_tensor(items, "cpu").add(1.0).div(2.0)
    mean = torch.tensor(stack.image_processor.image_mean)[:, None, None]
    std = torch.tensor(stack.image_processor.image_std)[:, None, None]
    return (x - mean) / std


def _pixel_values(stack, items, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(items), batch):
        out.append(stack.image_processor(images=[it["image"].convert("RGB") for it in items[s : s + batch]],
                                         return_tensors="pt")["pixel_values"])
    return torch.cat(out)


class _PretrainHeads(torch.nn.Module):
    """Pretraining-only modules, discarded afterwards: a visual prefix for image-conditioned LM, the
    contrastive text projection and temperature, and attribute read-outs."""

    def __init__(self, llm_dim: int, vision_dim: int, k: int, n_attr: int, n_phrase: int):
        super().__init__()
        self.k = k
        self.prefix = torch.nn.Linear(vision_dim, k * llm_dim)
        self.text_proj = torch.nn.Linear(llm_dim, vision_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.img_attr = torch.nn.Linear(vision_dim, n_attr)
        self.txt_attr = torch.nn.Linear(llm_dim, n_attr)
        self.phrase_attr = torch.nn.Linear(llm_dim, n_phrase)


def pretrain_text_vision(stack, data, p: "Preset", gen: torch.Generator, eval_items: list[dict] | None = None) -> dict:
    """Make the stand-in's ChatGLM a language model of the caption language and its CLIP tower an
    image encoder whose features say what is in the image: the roles ChatGLM3 and CLIP play, frozen,
    in the real stack. One loop, AdamW on both, with losses (heads discarded afterwards):

    * causal LM on captions and on object labels (phrases) — ChatGLM as a language model;
    * image-conditioned LM: CLIP embedding -> ``k`` soft prefix tokens -> the caption, so the LM reads a
      soft prompt (as ChatGLM3 reads instructions) and CLIP's embedding carries the whole caption;
    * CLIP-style symmetric InfoNCE between the CLIP embedding and ChatGLM's pooled caption vector;
    * linear attribute read-outs (background; colour and shape per caption slot; colour and shape of a
      phrase) from CLIP's embedding, the pooled caption vector and the pooled phrase vector.

    ``data``: a synthetic train-split dataset of at least ``tv_steps * tv_batch`` items; every step
    renders fresh ones (a small ViT overfits a fixed pool of a few thousand images).
    """
    from gill.data.vocab import COLORS, SHAPES

    te, vis, tok = stack.text_encoder, stack.vision, stack.tokenizer
    dev = next(te.parameters()).device
    k = int(_tiny_model_cfg().adapter.prefix_tokens)
    sizes = _attr_sizes()
    heads = _PretrainHeads(te.config.hidden_size, vis.config.projection_dim, k, sum(sizes),
                           len(COLORS) + len(SHAPES)).to(dev)
    te.train().requires_grad_(True)
    vis.train().requires_grad_(True)
    params = [*te.parameters(), *vis.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=p.tv_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(p.tv_steps, warmup=min(100, p.tv_steps // 10)))
    probe = [data[i] for i in range(8)]
    if not torch.allclose(_fast_pixel_values(stack, probe), _pixel_values(stack, probe), atol=1e-4):
        raise RuntimeError("the fast pixel path differs from the CLIPImageProcessor's")
    labels = sorted(f"{c}{s}" for c in COLORS for s in SHAPES)
    lab_ids = [tok.encode(l, add_special_tokens=False) for l in labels]
    lab_tgt = torch.tensor([[list(COLORS).index(l[:2]), SHAPES.index(l[2:])] for l in labels], device=dev)
    t0, hist = time.perf_counter(), []
    for step in range(p.tv_steps):
        batch = [data[i] for i in range(step * p.tv_batch, (step + 1) * p.tv_batch)]
        idx = list(range(len(batch)))
        cap_ids = [tok.encode(it["caption"], add_special_tokens=False) for it in batch]
        attrs = torch.tensor([attribute_targets(it) for it in batch], device=dev)
        img = vis(pixel_values=_fast_pixel_values(stack, batch).to(dev)).image_embeds  # [B, Dv]
        # image-conditioned LM
        ids, mask, lab, slots = _lm_batch(tok, k, [cap_ids[i] for i in idx], dev)
        last, _ = _run_lm(te, ids, mask, slots, heads.prefix(img).view(len(idx), k, -1))
        cond_lm, cond_acc = _lm_loss(te, last, lab)
        # plain LM on the captions; pooled = pre-norm final hidden at the last caption token (before eos)
        ids, mask, lab, _ = _lm_batch(tok, 0, [cap_ids[i] for i in idx], dev)
        last, pre = _run_lm(te, ids, mask)
        lm, _ = _lm_loss(te, last, lab)
        pooled = pre[:, -2]
        # phrases
        pj = torch.randint(0, len(labels), (min(p.tv_batch, len(labels)),), generator=gen).tolist()
        ids, mask, lab, _ = _lm_batch(tok, 0, [lab_ids[j] for j in pj], dev)
        last, pre = _run_lm(te, ids, mask)
        plm, _ = _lm_loss(te, last, lab)
        ph_loss, ph_acc = _attr_loss(heads.phrase_attr(pre[:, -2]), lab_tgt[pj], [len(COLORS), len(SHAPES)])
        # contrastive + attribute read-outs
        ti = F.normalize(heads.text_proj(pooled), dim=-1)
        ii = F.normalize(img, dim=-1)
        logits = heads.logit_scale.clamp(max=math.log(100.0)).exp() * ii @ ti.T
        tgt = torch.arange(len(idx), device=dev)
        clip = (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt)) / 2
        ia_loss, ia_acc = _attr_loss(heads.img_attr(img), attrs[idx], sizes)
        ta_loss, ta_acc = _attr_loss(heads.txt_attr(pooled), attrs[idx], sizes)
        loss = cond_lm + lm + 0.5 * plm + clip + p.tv_attr_weight * (ia_loss + ta_loss + ph_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append([cond_lm.item(), lm.item(), clip.item(), ia_acc.item(), ta_acc.item(), ph_acc.item(),
                     cond_acc.item()])
        if (step + 1) % max(1, p.tv_steps // 10) == 0:
            m = np.mean(hist[-50:], axis=0)
            log.info("text/vision step %d/%d  cond-LM %.3f (tok acc %.3f)  LM %.3f  clip %.3f  attr acc img %.2f txt %.2f "
                     "phrase %.2f", step + 1, p.tv_steps, m[0], m[6], m[1], m[2], m[3], m[4], m[5])
    te.eval().requires_grad_(False)
    vis.eval().requires_grad_(False)
    m = np.mean(hist[-50:], axis=0)
    out = {"tv_s": time.perf_counter() - t0, "tv_cond_lm": float(m[0]), "tv_lm": float(m[1]), "tv_clip": float(m[2]),
           "tv_img_attr_acc": float(m[3]), "tv_txt_attr_acc": float(m[4]), "tv_phrase_acc": float(m[5])}
    if eval_items:
        out.update(_pretrain_eval(stack, heads, eval_items, k))
    return out


@torch.no_grad()
def _pretrain_eval(stack, heads, items, k: int) -> dict:
    """Held-out: greedy captions through the pretraining prefix (exact match), contrastive recall@1."""
    from gill.models.chatglm import lm_logits
    from gill.inference.captioning import allowed_token_mask
    from gill.training.validation import recall_at_k

    te, vis, tok = stack.text_encoder, stack.vision, stack.tokenizer
    dev = next(te.parameters()).device
    # the captioning path's own restriction (no specials, no padded vocabulary rows): an early model emits them
    allowed = allowed_token_mask(te, tok)
    img = vis(pixel_values=_pixel_values(stack, items).to(dev)).image_embeds
    cap_ids = [tok.encode(it["caption"], add_special_tokens=False) for it in items]
    ids, mask, lab, _ = _lm_batch(tok, 0, cap_ids, dev)
    _, pre = _run_lm(te, ids, mask)
    ti = F.normalize(heads.text_proj(pre[:, -2]), dim=-1)
    sim = ti @ F.normalize(img, dim=-1).T
    prefix = heads.prefix(img).view(len(items), k, -1)
    rows = [[] for _ in items]
    eos = tok.eos_token_id
    for _ in range(32):
        ids, mask, _, slots = _lm_batch(tok, k, rows, dev)
        ids, mask, slots = ids[:, :-1], mask[:, :-1], slots[:, :-1]  # drop the eos _lm_batch appends
        last, _ = _run_lm(te, ids, mask, slots, prefix)
        nxt = lm_logits(te, last[:, -1]).masked_fill(~allowed, float("-inf")).argmax(-1).tolist()
        for r, t in zip(rows, nxt):
            r.append(t)
        if all(eos in r for r in rows):
            break
    hyps = [tok.decode(r[: r.index(eos)] if eos in r else r) for r in rows]
    exact = float(np.mean([h == it["caption"] for h, it in zip(hyps, items)]))
    return {"tv_eval_caption_exact": exact, "tv_eval_t2i_recall@1": recall_at_k(sim, 1),
            "tv_eval_i2t_recall@1": recall_at_k(sim.T, 1), "tv_eval_examples": list(zip([it["caption"] for it in items[:3]], hyps[:3]))}


# =============================================================================================
# (b) adapter training with the project's trainer
# =============================================================================================
def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def spatial_params(injection: str, inner_dim: int) -> int:
    """Parameters of the spatial adapter (tiny model config) at this injection and inner width."""
    from gill.models.spatial_adapter import SpatialAdapter
    from gill.models.stack import ensure_tiny_stack, load_stack

    global _PARAM_STACK
    if _PARAM_STACK is None:
        _PARAM_STACK = load_stack({"name": "tiny", "pretrained_path": ensure_tiny_stack(), "dtype": "fp32"})
    s = _tiny_model_cfg().adapter.spatial
    unet = _PARAM_STACK.unet
    adapter = SpatialAdapter(unet, phrase_dim=_PARAM_STACK.text_encoder.config.hidden_size, injection=injection,
                             blocks=s.blocks, inner_dim=inner_dim, token_dim=s.token_dim,
                             tokenizer_hidden=s.tokenizer_hidden, head_dim=s.head_dim)
    return sum(q.numel() for q in adapter.parameters())


_PARAM_STACK = None


def matched_inner_dims(inner_self: int) -> dict[str, tuple[int, int]]:
    """``{injection: (inner_dim, params)}`` with cross's width chosen (a multiple of the head
    width) so its parameter count is closest to self's: an equal-budget comparison."""
    head = int(_tiny_model_cfg().adapter.spatial.head_dim)
    target = spatial_params("self", inner_self)
    best = min(range(head, 32 * head + 1, head), key=lambda d: abs(spatial_params("cross", d) - target))
    return {"self": (inner_self, target), "cross": (best, spatial_params("cross", best))}


def train_with_trainer(stack_dir: Path, out_dir: Path, overrides: list[str], device: torch.device) -> dict:
    """One ``gill.training.recipe.run`` on a composed config; cached by its ``adapter.safetensors``."""
    from gill.training.recipe import run

    adapter = out_dir / "adapter.safetensors"
    done = out_dir / "BENCH_DONE.json"
    if adapter.is_file() and done.is_file():
        log.info("trainer run: reusing %s", out_dir)
        return json.loads(done.read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = compose_cfg([
        f"model.pretrained_path={stack_dir}", f"train.output_dir={out_dir}", "data.val=null",
        # fp32 everywhere: the pixel-space VAE's offsets need fp32's mantissa (see build_pixel_vae)
        "deepspeed=zero0", "train.precision=fp32", "train.save_every=0", "train.keep_last=1", "train.log_every=1",
        # torch's AdamW instead of DeepSpeed's FusedAdam: no JIT build (~1 min) for updating a few 100k parameters
        *(["+deepspeed.overrides.optimizer.params.torch_adam=true"] if device.type == "cuda" else []), *overrides,
    ])
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    micro = int(cfg.train.micro_batch_size) * int(cfg.train.grad_accum)
    step_s = statistics.median(micro / r["samples_per_s"] for r in train_rows[len(train_rows) // 5 :])
    info = {"wall_s": wall, "step_s": step_s, "final": {k: v for k, v in train_rows[-1].items() if "/" in k}}
    done.write_text(json.dumps(info, indent=1))
    return info


def adapter_overrides(p: Preset, injection: str, inner_dim: int, seed: int) -> list[str]:
    return [
        "train.modes=[generation]", f"model.adapter.spatial.injection={injection}",
        f"model.adapter.spatial.inner_dim={inner_dim}", f"train.max_steps={p.adapter_steps}",
        f"train.micro_batch_size={p.adapter_batch}", f"train.lr={p.adapter_lr}", "train.lr_schedule=cosine",
        f"train.warmup_steps={min(50, p.adapter_steps // 10)}", f"train.resolution={p.resolution}",
        f"model.caption_dropout={p.caption_dropout}", f"model.layout_dropout={p.layout_dropout}",
        f"data.num_samples={max(4096, p.adapter_steps * p.adapter_batch)}", f"train.seed={seed}",
        # only when set: the override is part of the cache key, and 0 is the config default (uniform timesteps)
        *([f"model.timestep_high_noise={p.adapter_high_noise}"] if p.adapter_high_noise else []),
        *([f"model.adapter.spatial.outside={p.adapter_outside}"] if p.adapter_outside != "null" else []),
    ]


def cr_overrides(p: Preset, seed: int) -> list[str]:
    return [
        "train.modes=[captioning,retrieval]", f"train.max_steps={p.cr_steps}", f"train.micro_batch_size={p.cr_batch}",
        f"train.lr={p.cr_lr}", "train.lr_schedule=cosine", f"train.warmup_steps={min(50, p.cr_steps // 10)}",
        f"train.resolution={p.resolution}", f"data.num_samples={max(4096, p.cr_steps * p.cr_batch)}",
        f"train.seed={seed}",
    ]


# =============================================================================================
# (c) evaluation
# =============================================================================================
def heldout_layouts(p: Preset, n: int, seed: int = 0) -> list[dict]:
    from gill.data.synthetic import SyntheticLayoutDataset

    data = SyntheticLayoutDataset(n, p.resolution, seed=seed, split=p.eval_split)
    return [data[i] for i in range(n)]


def negative_prompt(p: Preset, caption: str) -> str:
    if p.negative not in ("empty", "caption"):
        raise ValueError(f"preset.negative must be 'empty' or 'caption', got {p.negative!r}")
    return caption if p.negative == "caption" else ""


def detector_scores(images, layouts: list[dict]) -> dict:
    """Detector summary (mIoU, success, colour found) and colour-agnostic placement of ``images[i]``
    against ``layouts[i]``'s requested objects."""
    from gill.bench.detector import detect, foreground_in_boxes, summarize

    dets, place = [], []
    for image, item in zip(images, layouts):
        objects = [(o["label"], o["bbox"]) for o in item["objects"]]
        dets += detect(image, objects)
        place.append(foreground_in_boxes(image, [b for _, b in objects]))
    out = summarize(dets)
    out["fg_in_box"] = float(np.mean([q["precision"] for q in place]))
    out["box_covered"] = float(np.mean([q["recall"] for q in place]))
    return out


@torch.no_grad()
def grounding_scores(model, layouts: list[dict], p: Preset, beta: float, seed: int = 1000,
                     save_dir: Path | None = None, save_first: int = 0) -> dict:
    """Generate every layout (image ``i`` with seed ``seed + i``) and score it with the detector."""
    from gill.inference import draw_layout, generate_layout

    images, t0 = [], time.perf_counter()
    for i, item in enumerate(layouts):
        objects = [(o["label"], o["bbox"]) for o in item["objects"]]
        image = generate_layout(model, item["caption"], objects, steps=p.sample_steps, guidance_scale=p.guidance,
                                beta=beta, seed=seed + i, negative_prompt=negative_prompt(p, item["caption"]))[0]
        images.append(image)
        if save_dir is not None and i < save_first:
            save_dir.mkdir(parents=True, exist_ok=True)
            draw_layout(image.resize((256, 256)), objects).save(save_dir / f"{i:03d}.png")
    out = detector_scores(images, layouts)
    out["s_per_image"] = (time.perf_counter() - t0) / max(1, len(layouts))
    return out


@torch.no_grad()
def vae_ceiling_scores(stack_dir: Path, layouts: list[dict], device) -> dict:
    """The measurement's ceiling: the held-out layouts' own images through the stand-in's VAE (encode,
    decode), scored like generated ones. A generator that drew every object exactly in latent space
    would score this; the 4x4 pixel VAE turns a box edge inside a latent cell into a mixed-colour cell."""
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(stack_dir / "vae").to(device).eval()
    x = _images_tensor(layouts, device)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    arr = y.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return detector_scores([Image.fromarray(a) for a in arr], layouts)


@torch.no_grad()
def caption_retrieval_scores(model, pairs: list[dict], batch: int = 32, beams: int = 1) -> dict:
    """Held-out pairs: text->image and image->text recall@1 over all of them, caption exact match
    (greedy, or beam search with ``beams`` > 1)."""
    from gill.inference.captioning import beam_caption, caption
    from gill.inference.retrieval import embed_images, embed_texts
    from gill.training.validation import recall_at_k

    images = [it["image"] for it in pairs]
    captions = [it["caption"] for it in pairs]
    img = torch.cat([embed_images(model, images[s : s + batch]) for s in range(0, len(images), batch)])
    txt = embed_texts(model, captions, batch_size=batch)
    sim = txt @ img.T
    hyps = []
    for s in range(0, len(images), batch):
        if beams > 1:
            hyps += beam_caption(model, images[s : s + batch], num_beams=beams, max_new_tokens=int(model.caption_max_tokens))
        else:
            hyps += caption(model, images[s : s + batch], max_new_tokens=int(model.caption_max_tokens))
    exact = float(np.mean([h == c for h, c in zip(hyps, captions)]))
    return {
        "t2i_recall@1": recall_at_k(sim, 1), "i2t_recall@1": recall_at_k(sim.T, 1), "caption_exact": exact,
        "n_pairs": len(pairs), "examples": list(zip(captions[:4], hyps[:4])),
    }


# =============================================================================================
# the command
# =============================================================================================
def load_for_eval(adapter_path: Path, device):
    from gill.inference import load_trained

    return load_trained(adapter_path, device=device, dtype="fp32")


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


def run_benchmark(preset: str, injections: list[str], work_dir: Path, device: torch.device, seed: int = 0,
                  images_dir: Path | None = None, settings: list[str] = ()) -> dict:
    p = apply_settings(PRESETS[preset], list(settings))
    work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stack_dir, stand_stats = build_standin(work_dir, p, device, seed)
    dims = matched_inner_dims(p.inner_dim_self)
    results_text = text_encoder_checks(stack_dir, device)
    layouts = heldout_layouts(p, p.eval_layouts)
    results: dict = {"preset": dataclasses.asdict(p), "standin": stand_stats, "text_encoder": results_text,
                     "injection": {}, "device": str(device)}
    off = None
    for inj in injections:
        inner, params = dims[inj]
        overrides = adapter_overrides(p, inj, inner, seed)
        run_dir = work_dir / f"adapter-{p.name}-{stack_dir.name}-{inj}-{_key([*overrides, ADAPTER_LOSS_VERSION])}"
        info = train_with_trainer(stack_dir, run_dir, overrides, device)
        model = load_for_eval(run_dir / "adapter.safetensors", device)
        save = images_dir / inj if images_dir else None
        on = grounding_scores(model, layouts, p, beta=p.beta, save_dir=save, save_first=8)
        if off is None:  # beta=0: the adapter does nothing, so "off" is the same for every injection
            off = grounding_scores(model, layouts, p, beta=0.0, save_dir=images_dir / "off" if images_dir else None,
                                   save_first=8)
        gates = [float(g) for l in model.adapter.spatial.layers for g in torch.tanh(l.gates()).abs()]
        results["injection"][inj] = {"inner_dim": inner, "params": params, "train": info, "on": on,
                                     "mean_abs_tanh_gate": float(np.mean(gates))}
        log.info("%s: on %s | off %s", inj, on, off)
        del model
    results["off"] = off
    results["vae_ceiling"] = vae_ceiling_scores(stack_dir, layouts, device)
    if p.cr_steps > 0:
        overrides = cr_overrides(p, seed)
        run_dir = work_dir / f"capret-{p.name}-{stack_dir.name}-{_key(overrides)}"
        info = train_with_trainer(stack_dir, run_dir, overrides, device)
        model = load_for_eval(run_dir / "adapter.safetensors", device)
        results["captioning_retrieval"] = {"train": info, **caption_retrieval_scores(model, heldout_layouts(p, p.eval_pairs, seed=1),
                                                                                   beams=p.caption_beams)}
    results["total_s"] = time.perf_counter() - t_start
    return results


GOALS = {"miou_on": 0.6, "miou_off": 0.2, "recall@1": 0.9, "caption_exact": 0.8}


def render_markdown(res: dict, command: str) -> str:
    p, off = res["preset"], res["off"]
    ok = lambda b: "met" if b else "**missed**"  # noqa: E731
    lines = [
        "# Synthetic grounding benchmark",
        "",
        f"Command: `{command}` — device `{res['device']}`, preset `{p['name']}`, this invocation "
        f"{res['total_s'] / 60:.1f} min (stages already in the work dir are reused: the stand-in's build times and "
        "the trainer runs' step times are below; method and caveats in `docs/grounding_benchmark.md`).",
        "",
        f"Held-out layouts: {p['eval_layouts']} from the `{p.get('eval_split', 'test')}` split ({off['n']} requested objects), "
        f"{p['sample_steps']} Euler steps, guidance {p['guidance']} against "
        f"{'the caption with a null layout (layout guidance)' if p.get('negative') == 'caption' else 'an empty caption with a null layout'}, "
        f"adapter on for beta = {p['beta']} of the steps; "
        "\"off\" = the same stand-in stack, same seeds, beta = 0. Success = IoU > 0.5 between the requested box and "
        "the colour detector's box.",
        "",
        "| injection | adapter | mIoU | success | colour found | object px in boxes | boxes covered | spatial params | inner dim | step time (s) | mean abs tanh(gate) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for inj, r in res["injection"].items():
        on = r["on"]
        lines.append(
            f"| {inj} | on | {on['miou']:.3f} | {on['success']:.3f} | {on['found']:.3f} | {on['fg_in_box']:.3f} | "
            f"{on['box_covered']:.3f} | {r['params']:,} | "
            f"{r['inner_dim']} | {r['train']['step_s']:.3f} | {r['mean_abs_tanh_gate']:.3f} |"
        )
    lines.append(f"| — | off | {off['miou']:.3f} | {off['success']:.3f} | {off['found']:.3f} | {off['fg_in_box']:.3f} | "
                 f"{off['box_covered']:.3f} | 0 | — | — | — |")
    if "vae_ceiling" in res:
        c = res["vae_ceiling"]
        lines.append(f"| — | ground truth through the VAE (ceiling) | {c['miou']:.3f} | {c['success']:.3f} | {c['found']:.3f} | "
                     f"{c['fg_in_box']:.3f} | {c['box_covered']:.3f} | — | — | — | — |")
    lines += ["", "colour found: the requested colour appears at all; object px in boxes: of all pixels of any object "
              "colour, the fraction inside the requested boxes (colour-agnostic placement); boxes covered: the fraction "
              "of the boxes' area those pixels cover. Ceiling: the held-out layouts' real images encoded and decoded by "
              "the stand-in's VAE, then detected — what a generator that drew every object exactly would score."]
    lines += ["", "Adapter training (project trainer, `train.modes=[generation]`): "
              f"{p['adapter_steps']} steps x batch {p['adapter_batch']}, lr {p['adapter_lr']} (cosine), "
              f"caption dropout {p['caption_dropout']}, layout dropout {p['layout_dropout']}, "
              f"{p.get('adapter_high_noise', 0.0):.0%} of the timesteps from the noisier half. Step time = median "
              "optimizer-step wall time in that run (one CPU thread on CPU)."]
    s = res["standin"]
    vae = ("the fixed pixel-space AutoencoderKL (4x4 average pooling / nearest upsampling)" if s.get("vae") == "pixel"
           else f"the tiny VAE trained {p['vae_steps']} steps")
    lines += ["", f"Stand-in stack: {vae}, round-trip MSE {s['vae_recon_mse']:.4f} on [-1, 1] pixels, latent scaling "
              f"factor {s['vae_scaling_factor']:.3f}; the tiny Kolors-architecture UNet pretrained {p['unet_steps']} steps "
              f"x batch {p['unet_batch']} on {s['pool']} train images ({p.get('unet_high_noise', 0):.0%} of the timesteps "
              f"from the noisier half), caption conditioning only (final eps MSE "
              f"{s['unet_eps_mse']:.4f}), UNet built in {(s.get('vae_s', 0) + s['unet_s']) / 60:.1f} min."]
    if "tv_s" in s:
        lines += ["", f"Stand-in text encoder (tiny ChatGLM) and CLIP vision tower ({p['resolution']} px, "
                  f"patch {p.get('vision_patch', 8)}, width {p.get('vision_width', 64)}, "
                  f"{p.get('vision_layers', 3)} layers) pretrained together {p['tv_steps']} steps x batch "
                  f"{p['tv_batch']} (fresh train images each step), {s['tv_s'] / 60:.1f} min, then frozen. Held-out (128 `val` "
                  f"images), through the pretraining-only heads: caption exact match {s['tv_eval_caption_exact']:.3f}, "
                  f"contrastive recall@1 t2i {s['tv_eval_t2i_recall@1']:.3f} / i2t {s['tv_eval_i2t_recall@1']:.3f} (over 128, "
                  "for comparison with the trainer's own prefix / projections below)."]
    te = res.get("text_encoder")
    if te:
        lines += ["", "Phrase vectors (ChatGLM pooled vector of a label, what the spatial adapter reads), leave-one-out "
                  "nearest-centroid accuracy over the 32 labels (chance 0.125 / 0.25): colour "
                  f"{te['standin']['phrase_colour_loo_acc']:.3f}, shape {te['standin']['phrase_shape_loo_acc']:.3f} for the "
                  f"stand-in; {te['random']['phrase_colour_loo_acc']:.3f} / {te['random']['phrase_shape_loo_acc']:.3f} for "
                  "the tiny stack's random ChatGLM."]
    best = max(res["injection"].items(), key=lambda kv: kv[1]["on"]["miou"])
    lines += ["", "## Goals", "", "| goal | measured | status |", "|---|---:|---|",
              f"| mIoU with adapter ≥ {GOALS['miou_on']} (best: {best[0]}) | {best[1]['on']['miou']:.3f} | "
              f"{ok(best[1]['on']['miou'] >= GOALS['miou_on'])} |",
              f"| mIoU without adapter ≤ {GOALS['miou_off']} | {off['miou']:.3f} | {ok(off['miou'] <= GOALS['miou_off'])} |"]
    cr = res.get("captioning_retrieval")
    if cr:
        r1 = min(cr["t2i_recall@1"], cr["i2t_recall@1"])
        lines += [f"| retrieval recall@1 ≥ {GOALS['recall@1']} (t2i / i2t, {cr['n_pairs']} pairs) | "
                  f"{cr['t2i_recall@1']:.3f} / {cr['i2t_recall@1']:.3f} | {ok(r1 >= GOALS['recall@1'])} |",
                  f"| caption exact match ≥ {GOALS['caption_exact']} | {cr['caption_exact']:.3f} | "
                  f"{ok(cr['caption_exact'] >= GOALS['caption_exact'])} |"]
        lines += ["", f"Captioning + retrieval: project trainer, `train.modes=[captioning,retrieval]`, {p['cr_steps']} "
                  f"steps x batch {p['cr_batch']}, lr {p['cr_lr']}. Examples (reference → "
                  f"{'greedy caption' if p.get('caption_beams', 1) <= 1 else str(p['caption_beams']) + '-beam caption'}):", ""]
        lines += [f"* {ref} → {hyp}" for ref, hyp in cr["examples"]]
    lines += ["", "<details><summary>raw results (JSON)</summary>", "", "```json",
              json.dumps(res, ensure_ascii=False, indent=1, default=str), "```", "</details>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--injection", choices=["self", "cross", "both"], default="both")
    ap.add_argument("--out", default="benchmarks/grounding.md", help="markdown results table")
    ap.add_argument("--work-dir", default=None, help="cache of stand-in stacks and runs (default: ~/.cache/gill/bench)")
    ap.add_argument("--images", default=None, help="save the first generated layouts (boxes drawn) here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: tiny ops gain nothing from more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Preset field for this run, e.g. --set adapter_high_noise=0.5 (repeatable)")
    ap.add_argument("--only", choices=["text-vision"], default=None,
                    help="text-vision: only pretrain the stand-in's text encoder and tower, print their held-out numbers "
                         "as JSON (nothing cached or written; for tuning the vision_* / tv_* fields)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's progress bar; the log says enough
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.work_dir or Path.home() / ".cache" / "gill" / "bench")
    if args.only == "text-vision":
        res = probe_text_vision(apply_settings(PRESETS[args.preset], args.set), device, args.seed)
        print(json.dumps(res, ensure_ascii=False, indent=1))
        return res
    injections = ["self", "cross"] if args.injection == "both" else [args.injection]
    res = run_benchmark(args.preset, injections, work, device, args.seed, Path(args.images) if args.images else None,
                        args.set)
    command = "python -m gill.bench.grounding " + " ".join(sys.argv[1:] if argv is None else argv)
    md = render_markdown(res, command)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md, encoding="utf-8")
        log.info("wrote %s", args.out)
    print(md.split("<details>")[0])
    return res


if __name__ == "__main__":
    main()
