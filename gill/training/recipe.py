"""The training recipe, top to bottom: command line -> checks -> stack + adapter -> DeepSpeed engine -> steps.

``train_ds.py`` (Hydra) calls :func:`run`: every check that can fail on the config alone runs first, then
the frozen stack and the adapter are built (:func:`build_engine`), then :class:`gill.training.trainer.Trainer`
loops, and each of its steps is :func:`optimizer_step`::

    for batch in micro_batches:
        for mode in modes:                     # captioning, retrieval, generation (gill/models/modes.py)
            loss = engine(batch, mode)["loss"] * weight
            engine.backward(loss)              # this mode's graph is freed here
            engine.step()                      # DeepSpeed updates on the accumulation boundary only

DeepSpeed's ``gradient_accumulation_steps`` is ``len(modes) x grad_accum``, so only one mode's activations
are alive at a time and the update is the mean over modes and micro-batches. The few lines DeepSpeed needs
to stay exact come from ``gill/training/ds_exactness.py``.
"""
from __future__ import annotations

import gc
import logging
import math
import os
from pathlib import Path

import torch
from torch.profiler import record_function
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from gill.training import distributed
from gill.tools import resources
from gill.training.checkpoint import check_digest, check_resumable, resume_record
from gill.training.config_check import check_train_config
from gill.data.encoder_cache import cache_enabled, open_cache
from gill.data.collate import build_dataset, collate_layout
from gill.data.sampler import ResumableDistributedSampler
from gill.training.ds_config import build_ds_config, resolve_precision
from gill.training.ds_exactness import (
    check_deepspeed_internals,
    hold_update,
    make_cpu_adam_history_free,
    release_update,
    reset_offload_accumulators,
    touch_all_trainables,
    zero_surrogate,
)

log = logging.getLogger(__name__)


def lr_lambda(train_cfg, total_steps: int):
    warmup = int(train_cfg.warmup_steps)
    cosine = train_cfg.lr_schedule == "cosine"
    if train_cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"train.lr_schedule must be constant or cosine, got {train_cfg.lr_schedule!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_loader(dataset, train_cfg, shuffle: bool, seed: int):
    sampler = ResumableDistributedSampler(
        len(dataset), distributed.world_size(), distributed.rank(), seed=seed, shuffle=shuffle
    )
    loader = DataLoader(
        dataset, batch_size=int(train_cfg.micro_batch_size), sampler=sampler, collate_fn=collate_layout,
        num_workers=int(train_cfg.num_workers), drop_last=True,
    )
    return loader, sampler


def build_engine(cfg, ds_config: dict, device: torch.device, max_steps_hint: int):
    """Stack + adapter + DeepSpeed engine (no data); shared by training, tests and benchmarks."""
    import deepspeed

    from gill.models.model import GillModel
    from gill.models.stack import load_stack

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    stack = load_stack(cfg.model, device=device, dtype=dtype)
    torch.manual_seed(int(cfg.train.seed))  # the adapter's initial weights: same on every rank
    model = GillModel(stack, cfg.model).to(device)
    if cfg.train.get("flat_params", True):
        model.adapter.flatten()
    model.seed(int(cfg.train.seed) * 1000 + distributed.rank())
    sched = lr_lambda(cfg.train, max_steps_hint)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.trainable_parameters(),
        config=ds_config,
        lr_scheduler=lambda optimizer: make_scheduler(optimizer, sched),
    )
    model.adapter.refresh()  # DeepSpeed moved the trainables into its own buffers
    check_deepspeed_internals(engine)  # a workaround must never turn into a silent no-op
    if cache_enabled(cfg):
        # Training reads the encoders' outputs from the cache: the VAE and CLIP tower leave the
        # accelerator (after initialize, which moves and broadcasts every parameter). Validation
        # brings them back for its pass (GillModel.frozen_encoders_on_device).
        moved = model.park_frozen_encoders("cpu")
        log.info("encoder cache on: VAE + CLIP vision tower (%.1f MiB of weights) kept on the CPU", moved / 2**20)
    return engine


def make_scheduler(optimizer, lr_fn):
    """DeepSpeed hands its base optimizer here; patch it before the scheduler wraps its ``step``."""
    make_cpu_adam_history_free(optimizer)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)


def optimizer_step(
    engine, micro_batches: list[dict], modes: list[str], mode_weights: dict, before_update=None, after_micro_step=None
) -> dict:
    """Run one optimizer step; returns per-mode losses/metrics (means over micro-batches).

    ``before_update(engine)`` runs after the last backward, before the update (gradient probes);
    ``after_micro_step(mode)`` after each mode's backward + ``engine.step()`` (per-mode timing).

    A non-finite loss on any rank makes every rank back-propagate a zero surrogate instead (the
    backward is collective), and the update is skipped by running the boundary step at lr 0: no
    poisoned value reaches the weights (Adam's moments and step count still take in the step's finite
    gradients, tests/test_skipped_steps.py). A finite loss whose gradient is not finite is caught by
    DeepSpeed itself (its global norm check): it drops the gradients and skips the update, the
    moments and the LR schedule (``engine.was_step_applied()`` is false). Either way
    ``metrics["skipped"]`` is 1; ``metrics["grad_overflow"]`` tells the second kind.

    Reading each loss before its backward syncs the host with the GPU once per mode; the profile of the
    24 GiB recipe shows those waits at under 1 ms a step (the host-bound GPU has drained by then), so the
    check stays where it can still keep a poisoned gradient out (benchmarks/NOTES.md, run 19). The
    ``gill.*`` labels name the step's phases in a profile (``train.profile``, gill/tools/profiling.py).
    """
    model = engine.module
    sums: dict[str, float] = {}
    poisoned = False
    n_micro = len(micro_batches) * len(modes)
    i = 0
    for batch in micro_batches:
        for mode in modes:
            i += 1
            with record_function(f"gill.forward.{mode}"):
                out = engine(batch, mode)
            loss = out["loss"] * float(mode_weights.get(mode, 1.0))
            bad = distributed.any_rank(not bool(torch.isfinite(loss.detach()).all()))
            if bad:
                log.warning("non-finite %s loss (%s): skipping this optimizer step", mode, loss.item())
                poisoned = True
                loss = zero_surrogate(model)
            if i == n_micro:
                loss = loss + touch_all_trainables(model)
            if i == n_micro and poisoned:
                lrs = hold_update(engine)
            with record_function(f"gill.backward.{mode}"):
                engine.backward(loss)
            if i == n_micro and before_update is not None:
                before_update(engine)
            with record_function("gill.engine_step"):
                engine.step()
            if i == n_micro:
                reset_offload_accumulators(engine)
                overflow = not engine.was_step_applied()
                if overflow:
                    log.warning("non-finite gradient with finite losses: DeepSpeed skipped this optimizer step")
                    if poisoned:  # DeepSpeed skipped the scheduler's step too: lr 0 would stay
                        release_update(engine, lrs)
            del loss
            if after_micro_step is not None:
                after_micro_step(mode)
            # Metrics stay on the device until the step ends: reading one now would stall the GPU
            # while Python prepares the next mode.
            for k, v in out.items():
                key = f"{mode}/{k}"
                sums[key] = sums.get(key, 0.0) + v.detach().float().mean() / len(micro_batches)
            del out
    metrics = {k: float(v) for k, v in sums.items()}
    metrics["skipped"] = float(poisoned or overflow)
    metrics["grad_overflow"] = float(overflow)
    return metrics


def run(cfg, hydra_output_dir: str | None = None) -> dict:
    """Train according to ``cfg``; returns the last step's metrics."""
    from gill.training.trainer import Trainer

    check_train_config(cfg)  # types and ranges of train.*, named by key, before anything runs
    device = distributed.device_for_rank()
    cap = cfg.train.get("gpu_memory_cap_gib")
    fraction = resources.cap_gpu_memory(device, cap)
    if cap and fraction is not None:
        log.info("GPU memory capped at %s GiB (%.3f of %s)", cap, fraction, device)
    # Config-only checks first: a contradiction must fail before minutes of model loading.
    ds_config = build_ds_config(cfg, distributed.world_size(), on_gpu=device.type == "cuda")
    resolve_precision(cfg.train.precision, device.type == "cuda")
    dataset = build_dataset(cfg.data, int(cfg.train.resolution), int(cfg.train.seed))
    if cache_enabled(cfg):  # a stale or incomplete cache fails here, before any model loads
        dataset = open_cache(cfg, dataset, on_gpu=device.type == "cuda")
        log.info("training from the encoder cache %s (%d records%s)", cfg.cache.dir, len(dataset),
                 ", with prompt encodings" if dataset.prompts else "")
    val_cfg = cfg.data.get("val")
    val_dataset = build_dataset(val_cfg, int(cfg.train.resolution), int(cfg.train.seed)) if val_cfg else None

    distributed.init(device)
    # One run folder per run: rank 0's (Hydra made it there); the other ranks follow it.
    output_dir = Path(distributed.broadcast_object(hydra_output_dir or cfg.train.output_dir)).resolve()
    with open_dict(cfg):
        cfg.train.output_dir = str(output_dir)
    # The checkpoint to resume is found, verified and matched against this config before the run folder
    # is written to and before any model is built.
    resume = resolve_resume(output_dir, cfg)
    refuse_occupied_run_folder(output_dir, cfg.train.resume)
    if distributed.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        log.info("run folder %s, world size %d, device %s", output_dir, distributed.world_size(), device)
        log.info("DeepSpeed config: %s", ds_config)

    loader, sampler = build_loader(dataset, cfg.train, shuffle=True, seed=int(cfg.train.seed))
    val_loader = None
    if val_dataset is not None and distributed.is_main():
        val_loader = DataLoader(val_dataset, batch_size=int(cfg.train.micro_batch_size), collate_fn=collate_layout)
    steps_hint = int(cfg.train.max_steps or (len(loader) // int(cfg.train.grad_accum)) * int(cfg.train.epochs))
    engine = build_engine(cfg, ds_config, device, steps_hint)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(cfg, engine, loader, sampler, val_loader, resolved, output_dir)
    if resume is not None:
        check_digest(resume, engine.module.adapter)
        trainer.restore(trainer.ckpt.load(engine, resume))
        log.info("resumed from %s at step %d", resume, trainer.step)
    elif cfg.train.resume == "auto":
        log.info("train.resume=auto: no complete checkpoint in %s, starting fresh", trainer.ckpt.root)
        trainer.truncate_log(0)  # an attempt killed before its first checkpoint left records
    metrics = trainer.fit()
    if distributed.is_main():
        log.info("done: %d steps, adapter at %s", trainer.step, output_dir / "adapter.safetensors")
    # Free the engine (optimizer, gradient hooks, communication handles) here, not at interpreter teardown:
    # a one-process sweep's next job gets the memory back, and nothing native is left for exit (exit_now).
    engine.destroy()
    del trainer, engine, loader, val_loader
    gc.collect()
    return metrics


def resolve_resume(output_dir: Path, cfg) -> Path | None:
    """The checkpoint ``train.resume`` names, verified (rank 0 reads the files, every rank gets the verdict)
    and checked against this config; raises on every rank, naming the file or the differing keys."""
    from gill.training.checkpoint import CheckpointManager

    found = error = None
    if distributed.is_main():
        try:
            found = CheckpointManager(output_dir).resolve(cfg.train.resume)
            if found is not None:
                check_resumable(found, resume_record(cfg, distributed.world_size()))
        except (OSError, ValueError, RuntimeError) as e:
            error = (type(e).__name__, str(e))
    found, error = distributed.broadcast_object((found, error))
    if error is not None:
        kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(error[0], RuntimeError)
        raise kind(error[1])
    return found


def refuse_occupied_run_folder(output_dir: Path, resume) -> None:
    """A fresh run (``train.resume`` null) in a folder that holds another run's checkpoints or metrics
    would mix two runs' logs and checkpoints: refused on every rank, before any model loads."""
    if resume not in (None, "", False):
        return
    from gill.training.checkpoint import CheckpointManager

    taken = [str(p) for p in (output_dir / "metrics.jsonl",) if p.exists()]
    taken += [str(p) for p in CheckpointManager(output_dir).complete()]
    taken = distributed.broadcast_object(taken)
    if taken:
        raise FileExistsError(
            f"the run folder {output_dir} already holds a run ({', '.join(taken[:3])}): pass train.resume=auto "
            "to continue it, or a new train.output_dir for a new run"
        )


def hydra_rank_overrides() -> list[str]:
    """Extra Hydra overrides for ranks > 0: write no .hydra/ and no log file of their own."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]
