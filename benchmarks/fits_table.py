#!/usr/bin/env python
"""The "what fits where" table of docs/performance.md, from the memory planner (gill.tools.plan).

    python benchmarks/fits_table.py > /tmp/fits.md

For each card (24 GiB x 1 and x 3, 48, 80, 141) and recipe, the largest micro-batch per GPU (of
1, 2, 4, 8, 16) whose predicted device peak (reserved + CUDA context) fits, at 1024² and 512².
Rows the GPU benchmark measured (benchmarks/step_benchmark.json) are marked.
"""
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gill.tools.plan import GiB, plan  # noqa: E402

CARDS = [("24 GB x1", 24, 1), ("24 GB x3", 24, 3), ("48 GB", 48, 1), ("80 GB", 80, 1), ("141 GB (H200)", 139.8, 1)]
RECIPES = {  # the Kolors config (conf/model/kolors.yaml): UNet checkpointed, ChatGLM not, compiled
    "Kolors default + encoder cache (zero2_offload)": ([], True, "deepspeed"),
    "Kolors default, raw images (zero2_offload)": ([], False, "deepspeed"),
    "raw images, ChatGLM checkpointed too (zero2_offload)": (["model.gradient_checkpointing.text_encoder=true"], False,
                                                             "deepspeed"),
    "encoder cache, no checkpointing (zero2)": (["model.gradient_checkpointing.unet=false", "deepspeed=zero2"], True,
                                                "deepspeed"),
}
MEASURED = {  # (recipe key, res) -> benchmark variant measured (benchmarks/step_benchmark.json) and its cap
    ("Kolors default + encoder cache (zero2_offload)", 1024): ("tuned", 24.0),
    ("Kolors default, raw images (zero2_offload)", 1024): ("default-te-nockpt", 24.0),
    ("raw images, ChatGLM checkpointed too (zero2_offload)", 1024): ("default", 24.0),
}


def compose(overrides):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hc("config", overrides=list(overrides))


@functools.lru_cache(maxsize=None)
def device_peak(world: int, name: str, res: int, mb: int) -> int:
    """The planned device peak of a recipe (the card only decides whether it fits: planned once for all cards)."""
    ov, cached, opt = RECIPES[name]
    cfg = compose(["model=kolors_random", f"train.resolution={res}", f"train.micro_batch_size={mb}", *ov])
    return plan(cfg, world, 0.0, cached, opt, torch.bfloat16).device_peak


def main():
    bench = json.loads((ROOT / "benchmarks/step_benchmark.json").read_text())["rows"]
    ok = {(r["variant"], r["res"], r["mb"], r.get("cap_gib")) for r in bench if r["status"] == "ok"}
    print("| card | recipe | largest micro-batch 1024² | largest micro-batch 512² | predicted peak at mb 1, 1024² |")
    print("|---|---|---:|---:|---:|")
    for card, gib, world in CARDS:
        for name in RECIPES:
            cells = []
            for res in (1024, 512):
                best = None
                for mb in (1, 2, 4, 8, 16):
                    if device_peak(world, name, res, mb) > gib * GiB:
                        break
                    best = mb
                cell = ("≥ 16" if best == 16 else str(best)) if best else "does not fit"
                m = MEASURED.get((name, res))
                if m and best and world == 1 and gib == 24:
                    fitted = [mb for (v, r, mb, cap) in ok if (v, r, cap) == (m[0], res, m[1])]
                    if fitted:
                        cell += f" (measured: mb {max(fitted)} fits)"
                cells.append(cell)
            print(f"| {card} | {name} | {cells[0]} | {cells[1]} | {device_peak(world, name, 1024, 1) / GiB:.1f} GiB |",
                  flush=True)


if __name__ == "__main__":
    main()
