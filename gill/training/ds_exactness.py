"""Every fix that keeps a DeepSpeed step exact, each with its reason and the test that pins it.

* :func:`touch_all_trainables` + :func:`reset_offload_accumulators` — DeepSpeed 0.19.8's ZeRO-2 with the
  optimizer offloaded loses or leaks gradients of parameters that do not get a gradient in every backward
  (tests/test_trainer.py, ``test_zero2_step_matches_plain_pytorch_exactly``).
* :func:`make_cpu_adam_history_free` — DeepSpeedCPUAdam's bias correction depends on the process's
  history, so a resumed run drifts from an uninterrupted one (tests/test_trainer.py,
  ``test_resume_after_kill_is_exact``).
* :func:`zero_surrogate` + :func:`hold_update` / :func:`release_update` — a step with a non-finite loss on
  any rank must still run the collective backward and boundary step on every rank, and must change no
  weight: the loss becomes a zero with a graph and the boundary step runs at lr 0 (DeepSpeed has no
  "skip this step" call); if DeepSpeed skips that step itself (non-finite gradient), the scheduler does
  not step either and the lr is put back by hand (tests/test_skipped_steps.py, tests/test_trainer.py
  ``test_nan_steps_are_skipped_then_the_run_stops``).

Both reach into DeepSpeed's private attributes. :func:`check_deepspeed_internals` asserts at start-up
that they exist (a renamed attribute would otherwise turn a workaround into a silent no-op); the
versions they are proven on are pinned in setup.cfg.
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)
PROVEN_DEEPSPEED = ("0.19.8",)  # the versions the parity and resume tests passed on


class DeepSpeedInternalsError(RuntimeError):
    """A DeepSpeed private attribute that a workaround needs is gone (another DeepSpeed version)."""


def _require(obj, attr: str, what: str) -> None:
    if not hasattr(obj, attr):
        import deepspeed

        raise DeepSpeedInternalsError(
            f"DeepSpeed {deepspeed.__version__}: {type(obj).__name__} has no {attr!r}, which {what} needs "
            f"(gill/training/ds_exactness.py, proven on DeepSpeed {', '.join(PROVEN_DEEPSPEED)}); install a proven "
            "version or port the workaround"
        )


def check_deepspeed_internals(engine) -> None:
    """Fail at start-up, with the attribute's name, if a workaround's hook into DeepSpeed is missing."""
    import deepspeed

    if deepspeed.__version__ not in PROVEN_DEEPSPEED:
        log.warning("DeepSpeed %s: the workarounds in gill/training/ds_exactness.py are proven on %s only",
                    deepspeed.__version__, ", ".join(PROVEN_DEEPSPEED))
    _require(engine, "was_step_applied", "counting the steps DeepSpeed skips")
    optimizer = engine.optimizer
    if getattr(optimizer, "cpu_offload", False):
        _require(optimizer, "accumulated_grads_in_cpu", "reset_offload_accumulators")
    base = getattr(optimizer, "optimizer", None)
    if type(base).__name__ == "DeepSpeedCPUAdam":
        _require(base, "ds_opt_adam", "make_cpu_adam_history_free")
        _require(base.ds_opt_adam, "adam_update", "make_cpu_adam_history_free")
        _require(base, "opt_id", "make_cpu_adam_history_free")
        if not getattr(base, "_gill_history_free", False):
            raise DeepSpeedInternalsError("DeepSpeedCPUAdam was not patched by make_cpu_adam_history_free")


def zero_surrogate(model) -> torch.Tensor:
    """A zero loss with a graph: lets a rank take part in the collective backward without touching weights."""
    return model.adapter.logit_scale * 0.0


def hold_update(engine) -> list[float]:
    """Set every lr to 0 for the coming boundary step (its update is skipped); returns the lrs to put back.
    Normally the LR scheduler's step right after the boundary restores them by itself."""
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    return lrs


def release_update(engine, lrs: list[float]) -> None:
    """Put back the lrs of :func:`hold_update` when DeepSpeed skipped the boundary step (and so its scheduler)."""
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr


def touch_all_trainables(model) -> torch.Tensor:
    """A zero term that gives *every* trainable a (zero) gradient in this backward.

    Added to the last backward of each optimizer step: ZeRO-2 with the optimizer offloaded copies a
    parameter's accumulated gradient into the fp32 optimizer buffer only if the parameter receives
    a gradient in the boundary backward, so a parameter that an earlier mode alone uses (the visual
    prefix, the retrieval heads) would silently get no update.
    """
    return sum(p.reshape(-1)[0] * 0.0 for p in model.trainable_parameters())


def reset_offload_accumulators(engine) -> None:
    """Zero ZeRO-2's per-parameter CPU gradient accumulators after an optimizer step.

    They are overwritten only by a gradient in a step's *first* backward; a parameter that first
    gets its gradient in a later mode would otherwise add the previous step's gradient to its own.
    (Touching every parameter in the first backward also works but costs ~0.9 s per step at Kolors
    scale in DeepSpeed's per-parameter hooks; a memset of the buffers costs a few ms.)
    """
    optimizer = engine.optimizer
    if getattr(optimizer, "cpu_offload", False):
        for buffer in optimizer.accumulated_grads_in_cpu.values():  # its presence: check_deepspeed_internals
            buffer.zero_()


def make_cpu_adam_history_free(optimizer) -> bool:
    """Make DeepSpeedCPUAdam compute ``beta ** step`` afresh every step (returns whether patched).

    Its C++ kernel keeps ``beta ** step`` as a running product across calls and recomputes it with
    ``pow`` only when the betas change or the step jumps, which a resumed process does and an
    uninterrupted one does not: the two then differ in the last bits of every update. A one-element
    dummy update with other betas before each step sends the real step down the ``pow`` path.
    """
    if type(optimizer).__name__ != "DeepSpeedCPUAdam":
        return False
    _require(optimizer, "ds_opt_adam", "make_cpu_adam_history_free")
    _require(optimizer, "opt_id", "make_cpu_adam_history_free")
    dummy = [torch.zeros(1) for _ in range(4)]
    real_step = optimizer.step

    def step(self, closure=None):
        self.ds_opt_adam.adam_update(self.opt_id, 1, 0.0, 0.5, 0.5, 1e-8, 0.0, True, *dummy)
        return real_step(closure)

    optimizer.step = types.MethodType(step, optimizer)
    optimizer._gill_history_free = True
    return True
