"""Numbers you can trust, around resume: config values named by key, a resume that cannot fit refused
before any model is built, and a damaged newest checkpoint skipped by ``train.resume=auto``."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from gill.training.checkpoint import MARKER, CheckpointManager, damage
from gill.training.ds_config import ConfigError
from gill.training.recipe import run

pytestmark = pytest.mark.slow  # trains and resumes runs

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- config values, named by key, before any model loads ------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr must be a number"),
    ("train.resolution=0", "train.resolution must be >= 8"),
    ("train.resolution=60", "train.resolution must be a multiple of 8"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("+train.mode_weights.genration=0", r"train.mode_weights has unknown modes \['genration'\]"),
    ("train.mode_weights.retrieval=-1", "train.mode_weights.retrieval must be >= 0"),
    ("train.keep_last=0", "train.keep_last must be >= 1"),
])
def test_bad_train_values_fail_naming_the_key(tmp_path, override, message):
    # A stack path that does not exist: reaching any model load would fail differently.
    cfg = compose_cfg(override, "model.pretrained_path=/nonexistent", f"train.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run").exists()


# ---- one real run, then resumes that must be refused or must fall back ---------------------------------

COMMON = ("train.save_every=2", "train.keep_last=5", "train.seed=3", "data.val=null")


@pytest.fixture(scope="module")
def finished_run(tiny_stack_dir, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; its step-4 adapter kept aside as the reference."""
    import os
    import sys

    out = tmp_path_factory.mktemp("resume") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "train_ds.py"), f"model.pretrained_path={tiny_stack_dir}",
           f"train.output_dir={out}", "train.max_steps=4", *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(out / "adapter.safetensors", out.parent / "reference.safetensors")
    return out, cmd, env


def resume_cfg(stack, out, *overrides):
    return compose_cfg(f"model.pretrained_path={stack}", f"train.output_dir={out}", "train.max_steps=6", *COMMON,
                       *overrides)


@pytest.mark.parametrize("overrides, keys", [
    (("model.adapter.spatial.injection=self",), ["model.adapter.spatial.injection: checkpoint 'cross', this run 'self'"]),
    (("model.adapter.spatial.blocks=down", "train.flat_params=false"),
     ["model.adapter.spatial.blocks: checkpoint 'all', this run 'down'", "train.flat_params: checkpoint True"]),
])
def test_resume_with_other_trainables_is_refused_before_building(finished_run, tiny_stack_dir, monkeypatch,
                                                                 overrides, keys):
    out, _, _ = finished_run
    config = (out / "config.yaml").read_text()

    def no_build(*a, **k):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr("gill.training.recipe.build_engine", no_build)
    with pytest.raises(ValueError, match="trainables were defined differently") as err:
        run(resume_cfg(tiny_stack_dir, out, "train.resume=auto", *overrides))
    for key in keys:
        assert key in str(err.value)
    assert (out / "config.yaml").read_text() == config  # the run folder is untouched


def test_resume_path_that_does_not_exist_fails_before_writing(tiny_stack_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("gill.training.recipe.build_engine", lambda *a, **k: pytest.fail("built a model"))
    fresh = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        run(resume_cfg(tiny_stack_dir, fresh, f"train.resume={tmp_path / 'nowhere' / 'step_00000002'}"))
    assert not (fresh / "config.yaml").exists()


def test_zero_byte_model_states_are_damage(finished_run, tmp_path):
    out, _, _ = finished_run
    copy = tmp_path / "step_00000002"
    shutil.copytree(out / "checkpoints" / "step_00000002", copy)
    assert damage(copy) is None
    (copy / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert "mp_rank_00_model_states.pt has 0 bytes" in damage(copy)


def test_damaged_newest_checkpoint_auto_falls_back_and_stays_exact(finished_run, tiny_stack_dir, monkeypatch):
    out, cmd, env = finished_run
    newest = out / "checkpoints" / "step_00000004"
    optim = next(newest.glob("*optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])  # a copy cut short / a disk that filled up

    # An explicit path to it fails naming the file, before any model is built.
    monkeypatch.setattr("gill.training.recipe.build_engine", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(ValueError, match=f"{optim.name} has {len(data) // 2} bytes"):
        run(resume_cfg(tiny_stack_dir, out, f"train.resume={newest}"))
    monkeypatch.undo()

    # auto: falls back to step 2, says so, and redoes steps 3-4 exactly as the uninterrupted run did.
    proc = subprocess.run([*cmd, "train.resume=auto"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "checkpoint step_00000004 is damaged" in log and "falling back to step_00000002" in log
    assert "resumed from" in log and "step_00000002 at step 2" in log
    ref, got = load_file(out.parent / "reference.safetensors"), load_file(out / "adapter.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The damaged one was set aside, a good step 4 written in its place.
    assert (out / "checkpoints" / "step_00000004.damaged").is_dir()
    assert CheckpointManager(out).latest().name == "step_00000004" and damage(newest) is None
    marker = json.loads((newest / MARKER).read_text())
    assert marker["files"] and marker["trainables"]["train.flat_params"] is True


def test_digest_catches_other_shapes_under_the_same_config(tmp_path):
    from gill.training.checkpoint import adapter_digest, check_digest

    (tmp_path / MARKER).write_text(json.dumps({"step": 1, "trainables_digest": adapter_digest(torch.nn.Linear(4, 2))}))
    check_digest(tmp_path, torch.nn.Linear(4, 2))  # same names and shapes
    with pytest.raises(ValueError, match="trainables_digest"):
        check_digest(tmp_path, torch.nn.Linear(5, 2))
