#!/usr/bin/env python
"""Does the LM learn *when* to show an image? ``[IMG0]`` emission on held-out synthetic captions.

Trains the adapter on the tiny stack (CPU, plain AdamW on every trainable, the modes' own losses)
and prints, for each run, how often ``[IMG0]`` is the greedy next token at the end of a held-out
caption and inside one (:func:`gill.inference.interleaved.img_emission`), plus the held-out
retrieval recall@1 (text -> image among the held-out set) and, when generation trains, the
held-out mapper loss. AdamW at ``--lr`` (``--schedule cosine``: decayed to 0). Each ``--run``
is ``NAME:MODES:STEPS[:key=value,...]`` with model-config overrides, so GILL's choices and their
alternatives can be compared on the same data:

    python benchmarks/img_token_emission.py --lr 0.1 --run gill:retrieval:1500 \\
        --run ret_mean:retrieval:1500:adapter.retrieval_embedding=mean
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from gill.models import modes as M  # noqa: E402
from gill.data.collate import collate_layout  # noqa: E402
from gill.data.synthetic import SyntheticLayoutDataset  # noqa: E402
from gill.inference.interleaved import img_emission  # noqa: E402
from gill.models.model import GillModel  # noqa: E402
from gill.models.stack import load_stack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build(overrides: dict, seed: int = 0) -> GillModel:
    cfg = OmegaConf.load(ROOT / "conf/model/tiny.yaml")
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    stack = load_stack(cfg, device="cpu", dtype=torch.float32)
    torch.manual_seed(seed)
    model = GillModel(stack, cfg)
    model.seed(seed)
    return model


def with_features(model, items: list[dict]) -> dict:
    """A collated batch with its CLIP features precomputed (the frozen tower need not rerun)."""
    batch = collate_layout(items)
    batch["vision_features"] = model.vision_features(batch).cpu()
    return batch


def train(model, data: list[dict], modes: list[str], steps: int, lr: float, schedule: str = "constant") -> None:
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    model.train()
    for step in range(steps):
        batch = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        for mode in modes:  # one backward per mode, as the trainer does
            (model(batch, mode)["loss"] / len(modes)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def held_out(model, batches: list[dict], modes: list[str]) -> dict:
    captions = [c for b in batches for c in b["captions"]]
    out = img_emission(model, captions)
    txt = F.normalize(torch.cat([M.text_embedding(model, b["captions"]) for b in batches]).float(), dim=-1)
    img = F.normalize(torch.cat([model.adapter.image_proj(model.vision_features(b)) for b in batches]).float(), dim=-1)
    out["t2i_r@1"] = ((txt @ img.T).argmax(-1) == torch.arange(len(captions))).float().mean().item()
    if "generation" in modes:
        model.seed(123)
        out["mapper_loss"] = sum(float(model(b, "generation")["mapper_loss"]) for b in batches) / len(batches)
    return out


def parse_run(text: str):
    name, modes, steps, *rest = text.split(":", 3)
    overrides = {}
    for item in (rest[0].split(",") if rest else []):
        k, _, v = item.partition("=")
        overrides[k] = v
    return name, modes.split("+"), int(steps), overrides


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME:MODES:STEPS[:key=value,...]")
    p.add_argument("--stack", default=None,
                   help="frozen stack folder for every run (default: the tiny stack, whose ChatGLM is random); "
                        "a pretrained one: python -m gill.bench.grounding --preset ci --only standin")
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"), help="learning-rate schedule")
    return p.parse_args(argv)


def measure(spec: str, args: argparse.Namespace) -> tuple:
    """Train one ``--run`` and measure it: (name, modes, steps, overrides, before, after, seconds)."""
    name, modes, steps, overrides = parse_run(spec)
    if args.stack:
        overrides = {"pretrained_path": args.stack, **overrides}
    model = build(overrides, args.seed)
    train_ds = SyntheticLayoutDataset(args.train_samples, resolution=64, seed=args.seed, split="train")
    eval_ds = SyntheticLayoutDataset(args.eval_samples, resolution=64, seed=args.seed, split="val")
    bs = args.batch_size
    data = [with_features(model, [train_ds[i] for i in range(s, min(s + bs, len(train_ds)))]) for s in range(0, len(train_ds), bs)]
    evals = [with_features(model, [eval_ds[i] for i in range(s, min(s + bs, len(eval_ds)))]) for s in range(0, len(eval_ds), bs)]
    before = img_emission(model, [c for b in evals for c in b["captions"]])
    t0 = time.time()
    train(model, data, modes, steps, args.lr, args.schedule)
    res = held_out(model, evals, modes)
    return name, "+".join(modes), steps, overrides, before, res, time.time() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for spec in args.run:
        rows.append(measure(spec, args))
        print(f"# {rows[-1][0]}: done in {rows[-1][-1]:.0f} s", file=sys.stderr, flush=True)

    print("| run | modes | steps | overrides | [IMG0] at end (before -> after) | [IMG0] inside (before -> after) "
          "| t2i R@1 | mapper loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, modes, steps, ov, before, res, _ in rows:
        ov_text = ", ".join(f"{k}={v}" for k, v in ov.items()) or "GILL defaults"
        mapper = f"{res['mapper_loss']:.4f}" if "mapper_loss" in res else "-"
        print(f"| {name} | {modes} | {steps} | {ov_text} | {before['end']:.3f} -> **{res['end']:.3f}** (n={res['n_end']}) "
              f"| {before['inside']:.3f} -> **{res['inside']:.3f}** (n={res['n_inside']}) | {res['t2i_r@1']:.3f} | {mapper} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
