#!/usr/bin/env python
"""Multi-GPU scaling of the real training command: `launch/train_3gpu.sh` on N GPUs, one row per N.

Each row is a full training run (the launcher, Hydra, DeepSpeed, the trainer) on the first N GPUs, every GPU
capped at ``--cap`` GiB to emulate the seed's 24 GB cards; the table comes from the runs' metrics.jsonl:
steady-state samples/s (the first ``--warmup`` steps, compile and allocator warm-up, left out), speed-up and
efficiency against the 1-GPU row of the same invocation, peak GPU memory over the ranks, each rank's optimizer
state and where it lives (ZeRO-2 partitions it), host RSS, and whether all ranks ended with identical trainables.

    python benchmarks/scaling.py --rows 1:40:1.25,3:300:5 --out /tmp/scaling.md -- \
        model=kolors_random train.micro_batch_size=2 train.grad_accum=1 model.compile=false
    # rows: GPUS:MAX_STEPS:TIME_LIMIT_MIN (the run stops at whichever comes first, saving a checkpoint).
    # The launch script's micro-batch 1 cannot run on one GPU (retrieval needs two samples per step).

On a CPU-only machine the same command runs N CPU ranks (tiny model), which is how the test exercises it.
Each invocation writes its runs under a fresh ``<work-dir>/<timestamp>/gpusN``. To tabulate runs again from
their metrics.jsonl files (no training): ``--from-metrics 1=path/metrics.jsonl,3=path/metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_rows(spec: str) -> list[tuple[int, int, float]]:
    rows = []
    for item in spec.split(","):
        gpus, steps, minutes = item.split(":")
        rows.append((int(gpus), int(steps), float(minutes)))
    return rows


def launch(gpus: int, steps: int, minutes: float, cap: float, out: Path, overrides: list[str],
           script: str = "train_3gpu.sh") -> tuple[int, float]:
    """Run ``launch/<script>`` on ``gpus`` devices; returns (exit code, wall seconds). Log in ``out``.log."""
    env = dict(os.environ, NUM_GPUS=str(gpus))
    # The `deepspeed` of this interpreter (a venv, or a --target install's bin/) must come first on PATH.
    bins = [str(Path(sys.executable).parent)] + [str(Path(p) / "bin") for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PATH"] = ":".join(bins + [env.get("PATH", "")])
    cmd = ["bash", str(ROOT / "launch" / script), f"train.output_dir={out}", f"train.max_steps={steps}",
           f"train.time_limit_min={minutes}", f"train.gpu_memory_cap_gib={cap}", "train.save_every=0",
           "train.log_every=1", "data.val=null", *overrides]
    t0 = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return rc, time.perf_counter() - t0


def summarize(metrics: Path, gpus: int, warmup: int) -> dict:
    """One table row from a finished run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    final = [r for r in records if r["split"] == "final"][-1]
    steady = [r for r in train[warmup:] if not r.get("profiled")] or train[-1:]
    step_s = [r["step_s"] for r in steady]
    samples = sum(r["samples_per_s"] * r["step_s"] for r in steady)
    per_rank = final["per_rank"]
    losses = {k.split("/")[0]: (train[0].get(k), train[-1][k]) for k in train[-1] if k.endswith("/loss")}
    return {
        "gpus": gpus,
        "steps": len(train),
        "steady_steps": len(steady),
        "step_s_median": statistics.median(step_s),
        "samples_per_s": samples / sum(step_s),
        "samples_per_step": round(train[-1]["samples_per_s"] * train[-1]["step_s"]),
        "gpu_peak_gib": [r["gpu_peak_gib"] for r in per_rank],
        "gpu_reserved_peak_gib": [r["gpu_reserved_peak_gib"] for r in per_rank],
        "optimizer_state_gib": [r["optimizer_state_gib"] for r in per_rank],
        "optimizer_state_detail_gib": [r["optimizer_state_detail_gib"] for r in per_rank],
        "host_peak_rss_gib": [r["host_peak_rss_gib"] for r in per_rank],
        "replicas_identical": bool(final["replicas_identical"]),
        "losses_first_last": losses,
    }


def _fmt(x, nd=2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["gpus"] == 1), None)
    lines = [
        "| GPUs | steps (steady) | samples/step | s/step (median) | samples/s | speed-up | efficiency "
        "| GPU peak alloc / reserved, max over ranks (GiB) | optimizer state per rank (GiB) | host peak RSS per rank (GiB) "
        "| identical trainables |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['error']} |" + " |" * 9)
            continue
        speedup = r["samples_per_s"] / base["samples_per_s"] if base and "error" not in base else None
        eff = speedup / r["gpus"] if speedup is not None else None
        peaks = [p for p in r["gpu_peak_gib"] if p is not None]
        reserved = [p for p in r["gpu_reserved_peak_gib"] if p is not None]
        gpu = f"{max(peaks):.2f} / {max(reserved):.2f}" if peaks else "—"
        state = ", ".join(" + ".join(f"{v:.3f} {d}" for d, v in sorted(s.items())) for s in r["optimizer_state_gib"])
        rss = ", ".join(f"{v:.1f}" for v in r["host_peak_rss_gib"])
        lines.append(
            f"| {r['gpus']} | {r['steps']} ({r['steady_steps']}) | {r['samples_per_step']} | {_fmt(r['step_s_median'], 3)} "
            f"| {_fmt(r['samples_per_s'])} | {_fmt(speedup)}× | {_fmt(eff and 100 * eff, 0)}% | {gpu} | {state} | {rss} "
            f"| {'yes' if r['replicas_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1:40:1.25,3:300:5", help="GPUS:MAX_STEPS:TIME_LIMIT_MIN, comma-separated")
    ap.add_argument("--cap", type=float, default=24.0, help="GiB per GPU (emulated card); 0 = uncapped")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the steady-state numbers "
                    "(runs log every step; for --from-metrics, records)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="profile 3 steps from this one on every rank (<run>/profile/); they leave the steady state")
    ap.add_argument("--work-dir", default="outputs/scaling")
    ap.add_argument("--out", default=None, help="markdown file for the table (and a .json beside it)")
    ap.add_argument("--from-metrics", default=None, help="GPUS=metrics.jsonl,...: tabulate finished runs, train nothing")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every row (after --)")
    args = ap.parse_args()

    rows = []
    if args.from_metrics:
        for item in args.from_metrics.split(","):
            gpus, path = item.split("=", 1)
            rows.append(summarize(Path(path), int(gpus), args.warmup))
    else:
        # A fresh folder per invocation: a run folder that already holds a run would be refused.
        work = Path(args.work_dir).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        work.mkdir(parents=True)
        for gpus, steps, minutes in parse_rows(args.rows):
            out = work / f"gpus{gpus}"
            profile = [f"train.profile.first_step={args.profile_step}"] if args.profile_step else []
            rc, wall = launch(gpus, steps, minutes, args.cap, out, profile + args.overrides)
            if rc != 0 or not (out / "metrics.jsonl").exists():
                rows.append({"gpus": gpus, "error": f"exit {rc}, see {out}.log", "wall_s": wall})
            else:
                rows.append({**summarize(out / "metrics.jsonl", gpus, args.warmup), "wall_s": wall})
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        source = ({"from_metrics": args.from_metrics} if args.from_metrics
                  else {"rows_spec": args.rows, "overrides": args.overrides, "cap_gib": args.cap})
        Path(args.out).with_suffix(".json").write_text(json.dumps({**source, "rows": rows}, indent=1), encoding="utf-8")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
