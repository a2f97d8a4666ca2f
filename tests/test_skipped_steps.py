"""Skipped optimizer steps are counted, whoever skips them, and the DeepSpeed internals the workarounds
rely on are checked at start-up."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from gill.training import distributed
from gill.training.checkpoint import CheckpointManager
from gill.data.collate import collate_layout
from gill.data.synthetic import SyntheticLayoutDataset
from gill.training.ds_config import build_ds_config
from gill.training.ds_exactness import DeepSpeedInternalsError, check_deepspeed_internals
from gill.models.model import MODES
from gill.training.recipe import build_engine, build_loader
from gill.training.recipe import optimizer_step
from gill.training.trainer import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def batch(seed):
    ds = SyntheticLayoutDataset(2, resolution=64, seed=seed)
    return collate_layout([ds[0], ds[1]])


def adam_state(engine):
    base = engine.optimizer.optimizer
    (state,) = [base.state[p] for g in base.param_groups for p in g["params"]]  # flat: one tensor
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def test_loss_and_gradient_skips_are_counted_and_change_no_weight(tiny_stack_dir, tmp_path, monkeypatch):
    from gill.models import modes as mode_fns

    cfg = compose_cfg(f"model.pretrained_path={tiny_stack_dir}", "train.max_bad_steps=2", "train.max_steps=5",
                      "train.save_every=1", "data.val=null")
    distributed.init(torch.device("cpu"))
    engine = build_engine(cfg, build_ds_config(cfg, 1, on_gpu=False), torch.device("cpu"), 10)
    model = engine.module
    optimizer_step(engine, [batch(1)], list(MODES), {})  # a clean step: Adam has state
    weights = model.adapter.flat.detach().clone()
    adam = adam_state(engine)
    real = mode_fns.retrieval

    # 1. A non-finite loss: every rank back-propagates a zero surrogate and the step runs at lr 0.
    def nan_loss(m, b):
        out = real(m, b)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(mode_fns, "retrieval", nan_loss)
    metrics = optimizer_step(engine, [batch(2)], list(MODES), {})
    assert metrics["skipped"] == 1.0 and metrics["grad_overflow"] == 0.0
    assert torch.equal(model.adapter.flat, weights)
    # What docs/training.md says: Adam's moments and step count still advance on a loss-skipped step.
    after = adam_state(engine)
    assert after["step"] == adam["step"] + 1 and not torch.equal(after["exp_avg"], adam["exp_avg"])
    assert engine.get_lr()[0] == cfg.train.lr  # the lr-0 trick left no trace

    # 2. A finite loss whose gradient is not finite (d sqrt(|x|)/dx at 0 is nan): DeepSpeed skips by itself.
    def nan_grad(m, b):
        out = real(m, b)
        out["loss"] = out["loss"] + torch.sqrt((m.adapter.logit_scale * 0.0).abs()).sum()
        assert torch.isfinite(out["loss"])
        return out

    monkeypatch.setattr(mode_fns, "retrieval", nan_grad)
    skipped_before = engine.skipped_steps
    adam = adam_state(engine)
    metrics = optimizer_step(engine, [batch(3)], list(MODES), {})
    assert metrics["skipped"] == 1.0 and metrics["grad_overflow"] == 1.0
    assert engine.skipped_steps == skipped_before + 1
    assert torch.equal(model.adapter.flat, weights) and torch.isfinite(model.adapter.flat).all()
    assert adam_state(engine)["step"] == adam["step"]  # DeepSpeed's skip leaves the moments alone

    # 3. Such steps count towards train.max_bad_steps and are never written by a periodic save.
    loader, sampler = build_loader(SyntheticLayoutDataset(16, resolution=64), cfg.train, True, 0)
    trainer = Trainer(cfg, engine, loader, sampler, None, {}, tmp_path)
    with pytest.raises(NonFiniteLossError, match="2 consecutive optimizer steps were skipped"):
        trainer.fit()
    assert CheckpointManager(tmp_path).complete() == []
    assert torch.equal(model.adapter.flat, weights)
    check_deepspeed_internals(engine)  # the real engine has what the workarounds need


def test_missing_deepspeed_internals_fail_at_start_up_naming_them():
    engine = SimpleNamespace(was_step_applied=lambda: True, optimizer=SimpleNamespace(cpu_offload=True))
    with pytest.raises(DeepSpeedInternalsError, match="accumulated_grads_in_cpu.*reset_offload_accumulators"):
        check_deepspeed_internals(engine)
    cpu_adam = type("DeepSpeedCPUAdam", (), {})()
    engine.optimizer = SimpleNamespace(cpu_offload=True, accumulated_grads_in_cpu={}, optimizer=cpu_adam)
    with pytest.raises(DeepSpeedInternalsError, match="ds_opt_adam.*make_cpu_adam_history_free"):
        check_deepspeed_internals(engine)
