"""benchmarks/scaling.py: the launch script on 1 and 2 CPU ranks end to end, and the stored H200 records
still tabulate to the numbers the README and benchmarks/scaling.md quote."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCALING = ROOT / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_runs_the_launch_script_on_1_and_2_ranks(tiny_stack_dir, tmp_path, child_env):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCALING), "--rows", "1:3:5,2:3:5", "--warmup", "1", "--work-dir", str(tmp_path / "w"),
         "--out", str(out), "--", "model=tiny", f"model.pretrained_path={tiny_stack_dir}", "train.resolution=64",
         "train.micro_batch_size=2", "train.grad_accum=1"],
        capture_output=True, text=True, env=child_env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["gpus"], r["steps"], r["samples_per_step"]) for r in rows] == [(1, 3, 2), (2, 3, 4)]
    assert all(r["replicas_identical"] for r in rows)
    one, two = (r["optimizer_state_gib"] for r in rows)
    assert len(two) == 2 and abs(two[0]["cpu"] * 2 - one[0]["cpu"]) <= 0.01 * one[0]["cpu"]  # ZeRO-2 halves it
    assert "| 2 | 3 (2) | 4 |" in out.read_text()


def test_stored_h200_records_give_the_documented_table():
    d = ROOT / "benchmarks" / "results" / "scaling"
    proc = subprocess.run(
        [sys.executable, str(SCALING), "--from-metrics",
         f"1={d / 'run1_metrics_1gpu.jsonl'},3={d / 'run1_metrics_3gpu.jsonl'},3={d / 'run1_metrics_3gpu_long.jsonl'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    documented = (ROOT / "benchmarks" / "scaling.md").read_text()
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert len(table) == 3
    for line in table:
        cells = line.split("|")[1:8]  # GPUs .. efficiency
        assert "|".join(cells) in documented.replace("| 3 (longer call) |", "| 3 |"), line
