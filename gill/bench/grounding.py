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
    ``vae/``  a fixed pixel-space AutoencoderKL (``vae_pool`` x ``vae_pool`` pooling / nearest upsampling, weights set by
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

Modules: presets in :mod:`gill.bench.grounding_presets`, the stand-in in :mod:`gill.bench.standin`
and :mod:`gill.bench.standin_text_vision`, scores and report in :mod:`gill.bench.grounding_metrics`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gill.bench.grounding_metrics import (
    caption_retrieval_scores,
    grounding_scores,
    heldout_layouts,
    load_for_eval,
    render_markdown,
    vae_ceiling_scores,
)
from gill.bench.grounding_presets import (
    ADAPTER_LOSS_VERSION,
    PRESETS,
    Preset,
    REPO,
    STANDIN_VERSION,
    _TV_SUBDIRS,
    _key,
    apply_settings,
    standin_key,
)
from gill.bench.standin import _images_tensor, build_pixel_vae, encode_captions, encode_pool, train_unet, train_vae
from gill.bench.standin_text_vision import (
    _tiny_model_cfg,
    build_text_vision,
    probe_text_vision,
    save_text_vision_cache,
    text_encoder_checks,
    text_vision_cache,
)

log = logging.getLogger("gill.bench.grounding")


def build_standin(work_dir: Path, p: Preset, device: torch.device, seed: int = 0) -> tuple[Path, dict]:
    """The stand-in frozen stack directory (built once per preset; returns it and build stats)."""
    from gill.data.synthetic import SyntheticLayoutDataset
    from gill.models.model import vae_scale_factor
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
        stack.vae = build_pixel_vae(p.vae_pool).to(device)
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
    # the pipelines' default size is the UNet's sample size times the VAE's downscale
    stack.unet.register_to_config(sample_size=p.resolution // vae_scale_factor(stack.vae))
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
    ap.add_argument("--only", choices=["text-vision", "standin"], default=None,
                    help="text-vision: only pretrain the stand-in's text encoder and tower, print their held-out numbers "
                         "as JSON (nothing cached or written; for tuning the vision_* / tv_* fields); "
                         "standin: only build (or reuse) the stand-in stack and print its folder and build stats")
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
    if args.only == "standin":
        work.mkdir(parents=True, exist_ok=True)
        stack_dir, stats = build_standin(work, apply_settings(PRESETS[args.preset], args.set), device, args.seed)
        res = {"stack_dir": str(stack_dir), "build": stats}
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
