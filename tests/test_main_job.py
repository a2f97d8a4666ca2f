"""The README's main-job command runs to completion: all three modes through DeepSpeed on the
embedded tiny default, a checkpoint, an adapter, logs and a validation pass written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each test runs train_ds.py in a child process


def test_readme_main_job(tmp_path, child_env):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python train_ds.py train.output_dir=outputs/quickstart" in readme
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "train_ds.py", f"train.output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=child_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for mode in ("captioning", "retrieval", "generation"):
        assert all(r[f"{mode}/loss"] > 0 for r in train)
    val = [r for r in records if r["split"] == "val"]
    assert val and "retrieval/t2i_recall@1" in val[-1] and "captioning/token_acc" in val[-1]
    assert (out / "adapter.safetensors").exists()
    assert (out / "checkpoints" / "step_00000004" / "gill_state.json").exists()
    assert list((out / "tb").iterdir()) and (out / ".hydra" / "config.yaml").exists()
    # validation images come from the inference path, boxes drawn
    assert len(list((out / "val_images" / "step_00000004").glob("*.png"))) == 2


def test_one_process_sweep_runs_every_job(tmp_path, child_env):
    """`python train_ds.py -m a=1,2`: jobs run one after another in one process and share its
    process group (a run that tore the group down broke the next job's DeepSpeed engine)."""
    proc = subprocess.run(
        [sys.executable, "train_ds.py", "-m", "train.lr=1e-4,2e-4", "train.max_steps=1", "data.val=null",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=child_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in ((0, 1e-4), (1, 2e-4)):
        run = tmp_path / "sweep" / str(job)
        assert (run / "adapter.safetensors").exists(), job
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert abs(first["lr"] - lr) < 1e-12, (job, first)
