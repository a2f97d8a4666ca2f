"""Grounding benchmark evaluation: held-out layouts, the colour detector's scores (adapter on /
off, the VAE ceiling), retrieval recall and caption exact match, the markdown report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from gill.bench.grounding_presets import Preset
from gill.bench.standin import _images_tensor


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
    would score this; the pixel VAE turns a box edge inside a latent cell into a mixed-colour cell."""
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
              "optimizer-step wall time in that run (`--threads` CPU threads on CPU)."]
    s = res["standin"]
    k = p.get("vae_pool", 4)
    vae = (f"the fixed pixel-space AutoencoderKL ({k}x{k} average pooling / nearest upsampling)" if s.get("vae") == "pixel"
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
