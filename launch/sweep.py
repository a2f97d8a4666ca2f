#!/usr/bin/env python
"""Run a Hydra-style sweep where every job is a full distributed run.

``python train_ds.py -m ...`` sweeps inside one process, which is right for one process per job;
with several GPUs each job needs its own ``deepspeed`` launch. This expands ``key=a,b,c`` the way
Hydra's basic sweeper does (Cartesian product, in order) and runs the jobs one after another:

    python launch/sweep.py --num_gpus 3 --sweep_dir outputs/sweep1 train.lr=1e-4,3e-4 model.adapter.spatial.injection=self,cross

Job ``i`` writes to ``<sweep_dir>/<i>``; a job that fails is reported and the sweep goes on.
``--dry_run`` prints the commands.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def expand(overrides: list[str]) -> list[list[str]]:
    axes = []
    for item in overrides:
        key, _, values = item.partition("=")
        # Lists ([a,b]) and quoted values are single values, as in Hydra.
        is_sweep = "," in values and not values.startswith(("[", "{", "'", '"'))
        axes.append([f"{key}={v}" for v in values.split(",")] if is_sweep else [item])
    return [list(combo) for combo in itertools.product(*axes)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_gpus", type=int, default=1)
    ap.add_argument("--hostfile", default=None)
    ap.add_argument("--sweep_dir", required=True)
    ap.add_argument("--launcher", default="deepspeed", help="deepspeed | python (one process per job)")
    ap.add_argument("--dry_run", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    failures = 0
    for i, job in enumerate(expand(overrides)):
        out = Path(args.sweep_dir) / str(i)
        if args.launcher == "python":
            cmd = [sys.executable, str(ROOT / "train_ds.py")]
        else:
            cmd = ["deepspeed", f"--master_port={29500 + i % 100}"]
            cmd += [f"--hostfile={args.hostfile}"] if args.hostfile else [f"--num_gpus={args.num_gpus}"]
            cmd += [str(ROOT / "train_ds.py")]
        cmd += [*job, f"train.output_dir={out}"]
        print(f"[sweep] job {i}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            failures += 1
            print(f"[sweep] job {i} failed with exit code {rc}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
