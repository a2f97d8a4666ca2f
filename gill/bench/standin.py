"""The grounding benchmark's stand-in for frozen Kolors, its image side: a fixed pixel-space VAE
(weights set by hand) and the tiny UNet pretrained on the synthetic shapes with caption
conditioning only. ``gill.bench.grounding.build_standin`` assembles the stand-in directory.
"""
from __future__ import annotations

import logging
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from gill.bench.grounding_presets import Preset

log = logging.getLogger("gill.bench.grounding")


# =============================================================================================
# (a) the stand-in frozen stack
# =============================================================================================
def _images_tensor(items, device) -> torch.Tensor:
    arr = np.stack([np.asarray(it["image"].convert("RGB"), dtype=np.float32) for it in items])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).to(device)


# The fixed pixel-space "VAE": a real AutoencoderKL whose weights are set by hand so that
#   encode(x) = pool x pool average of the RGB pixels in latent channels 0-2 (channel 3 = 0, std 3e-7)
#   decode(z) = nearest-neighbour upsampling of channels 0-2 by the same factor (pool 4 or 2).
# Every ResnetBlock2D's conv2 and every attention's to_out are zero (identity through the residual),
# the stride-2 downsampling convs average 2x2, the upsampling convs pass through. The two GroupNorm +
# SiLU at the ends would destroy absolute colour, so each colour travels in a GroupNorm group of four
# channels [c, -c, K, -K]: the group's mean is exactly 0 and its std K/sqrt(2) (to 1e-4 for K=100),
# which the norm's weight undoes; its bias shifts by 20 so SiLU(x + 20) = x + 20 to 4e-8, and the
# following conv's bias takes the 20 back. Exact to 1e-4 in fp32 (tests check the round trip); not
# meant for bf16 (the K offsets need fp32 mantissa), so the benchmark runs the stand-in in fp32.
_K, _SHIFT = 100.0, 20.0


def pixel_vae_config(pool: int = 4) -> dict:
    """The AutoencoderKL config of :func:`build_pixel_vae`: one block per halving, plus the last (which
    does not downsample), so ``pool`` = 2 ** (blocks - 1), diffusers' own scale factor."""
    if pool not in (2, 4, 8):
        raise ValueError(f"the pixel VAE pools by 2, 4 or 8, got {pool}")
    blocks = int(math.log2(pool)) + 1
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(32,) * blocks, latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0, force_upcast=True,
    )


@torch.no_grad()
def build_pixel_vae(pool: int = 4):
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D

    vae = AutoencoderKL(**pixel_vae_config(pool))
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
