"""The loop around the optimizer step: data position, logging, validation, checkpoints, stopping.

:meth:`Trainer.fit` draws ``grad_accum`` micro-batches per step and hands them to
:func:`gill.training.recipe.optimizer_step` (where every mode's forward and ``engine.backward`` run).
Around it: counting skipped steps toward ``train.max_bad_steps``, progress/TensorBoard logging,
periodic validation, checkpoint/resume, SIGTERM/SIGINT and ``train.time_limit_min`` (finish the step,
save, exit 0), and the per-rank resource report at the end (gill/tools/resources.py).
"""
from __future__ import annotations

import gc
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from gill.training import distributed
from gill.tools import resources
from gill.training.checkpoint import CheckpointManager, adapter_digest, atomic_write_text, export_adapter, resume_record
from gill.training.recipe import optimizer_step
from gill.tools.profiling import StepProfiler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def freeze_heap() -> None:
    """Move every object alive now (stack, engine, compiled graphs) to the collector's permanent generation.

    A full collection walks every tracked object: after compiling the tiny stack that is ~740k objects and 0.33-0.46 s
    per collection on a CPU. Whether full collections cause the 24 GB recipe's slow step every 12-16 steps is not
    measured yet (benchmarks/NOTES.md, runs 15-16); torchtitan's manual GC and Megatron's ``manual_gc`` exist for it."""
    gc.collect()
    gc.freeze()
    log.info("garbage collector: %d objects frozen (train.gc_freeze_after)", gc.get_freeze_count())


class Trainer:
    def __init__(self, cfg, engine, loader, sampler, val_loader, resolved_config: dict, output_dir: Path):
        self.cfg, self.t = cfg, cfg.train
        self.engine = engine
        self.model = engine.module
        self.loader, self.sampler, self.val_loader = loader, sampler, val_loader
        # Only rank 0 holds the validation loader, but every rank must enter validate() (its barrier).
        self.has_val = distributed.any_rank(val_loader is not None)
        self.resolved_config = resolved_config
        self.output_dir = output_dir
        self.ckpt = CheckpointManager(output_dir, self.t.keep_last)
        self.modes = list(self.t.modes)
        self.grad_accum = int(self.t.grad_accum)
        self.steps_per_epoch = len(loader) // self.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {len(loader)} micro-batches per rank, fewer than train.grad_accum={self.grad_accum}: "
                "use more data or a smaller micro_batch_size/grad_accum"
            )
        self.max_steps = int(self.t.max_steps) if self.t.max_steps else self.steps_per_epoch * int(self.t.epochs)
        self.step, self.epoch, self.micro_in_epoch = 0, 0, 0
        self.bad_in_a_row = 0
        self._stop = False
        self.writer = None
        self.metrics_file = output_dir / "metrics.jsonl"
        self.purge_from = None  # TensorBoard step from which a resumed run drops the old events

    # ---- state ------------------------------------------------------------------------------
    def client_state(self) -> dict:
        """Collective. DeepSpeed writes the client state from rank 0 only, so every rank's random
        streams are gathered into it (a rank restores its own)."""
        rng = {"model": self.model.rng.get_state(), "torch": torch.get_rng_state()}
        return {
            "step": self.step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "rng_per_rank": distributed.all_gather_object(rng),
        }

    def marker_record(self) -> dict:
        """What the checkpoint's marker records for the checks before a resume (gill/training/checkpoint.py)."""
        return {**resume_record(self.cfg, distributed.world_size()),
                "trainables_digest": adapter_digest(self.model.adapter)}

    def restore(self, state: dict) -> None:
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        rng = state["rng_per_rank"][distributed.rank()]
        self.model.rng.set_state(rng["model"])
        torch.set_rng_state(rng["torch"])
        self.truncate_log(self.step)

    def truncate_log(self, step: int) -> None:
        """Drop what the log holds past ``step``: a resumed run redoes those steps and must log each once.
        Also dropped: ``final`` records (the run is not final any more) and a line a kill tore in half.
        Atomic, like every file the run writes; TensorBoard's events past ``step`` are purged likewise."""
        self.purge_from = step + 1
        if not distributed.is_main() or not self.metrics_file.exists():
            return
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step and record["split"] != "final":
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            atomic_write_text(self.metrics_file, "".join(kept))
            log.info("metrics.jsonl: dropped %d records past step %d", len(lines) - len(kept), step)

    def save(self) -> None:
        self.ckpt.save(self.engine, self.step, self.client_state(), self.marker_record())
        self.export()

    def export(self) -> None:
        export_adapter(self.model.adapter, self.output_dir / "adapter.safetensors", self.resolved_config, self.step)

    # ---- signals ----------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        log.warning("signal %d: finishing the current step, then saving and exiting", signum)
        self._stop = True

    def _install_signal_handlers(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)

    # ---- loop -------------------------------------------------------------------------------
    def _micro_batches(self):
        """Endless micro-batches, resuming at (epoch, micro_in_epoch)."""
        while True:
            start = self.micro_in_epoch * int(self.t.micro_batch_size)
            self.sampler.set_epoch(self.epoch, start)
            if hasattr(self.loader.dataset, "set_epoch"):
                self.loader.dataset.set_epoch(self.epoch)
            usable = self.steps_per_epoch * self.grad_accum  # whole optimizer steps only
            for batch in self.loader:
                if self.micro_in_epoch >= usable:
                    break
                self.micro_in_epoch += 1
                yield batch
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0

    def fit(self) -> dict:
        self._install_signal_handlers()
        main = distributed.is_main()
        if main:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events the interrupted run logged after its checkpoint are dropped.
            self.writer = SummaryWriter(str(self.output_dir / "tb"), purge_step=self.purge_from)
        from tqdm.auto import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
        world = distributed.world_size()
        samples_per_step = int(self.t.micro_batch_size) * self.grad_accum * world
        stream = self._micro_batches()
        last = {}
        prof_cfg = self.t.get("profile") or {}
        profiler = StepProfiler(prof_cfg.get("first_step"), int(prof_cfg.get("steps", 3)), self.output_dir / "profile",
                                distributed.rank(), self.model.device)
        limit_s = float(self.t.get("time_limit_min") or 0) * 60
        started = time.monotonic()
        freeze_after, first_step = int(self.t.get("gc_freeze_after") or 0), self.step
        try:
            while self.step < self.max_steps:
                profiler.before_step(self.step + 1)  # data loading is part of a step's cost
                with record_function("gill.data"):
                    micro = [next(stream) for _ in range(self.grad_accum)]
                t0 = time.perf_counter()
                metrics = optimizer_step(self.engine, micro, self.modes, self.t.mode_weights)
                dt = time.perf_counter() - t0
                self.step += 1
                if self.step - first_step == freeze_after:
                    freeze_heap()
                profiler.after_step(self.step)
                if profiler.covers(self.step):
                    metrics["profiled"] = 1.0  # slower by the profiler's overhead: not a throughput sample
                self._check_finite(metrics)
                metrics["lr"] = self.engine.get_lr()[0]
                metrics["samples_per_s"] = samples_per_step / dt
                metrics["step_s"] = dt
                peak = resources.gpu_peak_gib(self.model.device)
                if peak is not None:
                    metrics["gpu_peak_gib"] = peak
                last = metrics
                if main:
                    bar.update(1)
                    bar.set_postfix(self._postfix(metrics), refresh=False)
                    if self.step % max(1, int(self.t.log_every)) == 0 or self.step == self.max_steps:
                        self._log(metrics, "train")
                out_of_time = limit_s > 0 and time.monotonic() - started >= limit_s
                signalled, out_of_time = distributed.any_rank_each(self._stop, out_of_time)
                stop = signalled or out_of_time
                at_end = self.step == self.max_steps
                if self.has_val and (
                    (self.t.val_every and self.step % int(self.t.val_every) == 0) or at_end
                ):
                    self.validate()
                periodic = self.t.save_every and self.step % int(self.t.save_every) == 0
                # A skipped step changed no weight, but it is no moment to write a checkpoint either.
                if stop or at_end or (periodic and not metrics["skipped"]):
                    self.save()
                if stop:
                    why = "by signal" if signalled else "at train.time_limit_min"
                    log.warning("stopped %s at step %d; checkpoint saved", why, self.step)
                    break
        finally:
            gc.unfreeze()  # what the run built can be collected again (a one-process sweep's next job)
            profiler.close()  # a run that stops inside the profiled steps still writes what it saw
            bar.close()
            if self.writer is not None:
                self.writer.close()
        last["replicas_identical"] = float(distributed.identical_across_ranks(self.model.adapter))
        last["per_rank"] = distributed.all_gather_object(resources.rank_report(self.engine, self.model.device))
        if main:
            log.info("trainables identical on all %d ranks: %s", world, bool(last["replicas_identical"]))
            for r, rep in enumerate(last["per_rank"]):
                log.info("rank %d: GPU peak %s GiB, optimizer state %s GiB, host peak RSS %.1f GiB", r,
                         None if rep["gpu_peak_gib"] is None else round(rep["gpu_peak_gib"], 2),
                         {d: round(v, 3) for d, v in rep["optimizer_state_gib"].items()}, rep["host_peak_rss_gib"])
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"split": "final", "step": self.step, **last}) + "\n")
        return last

    def _check_finite(self, metrics: dict) -> None:
        if metrics["skipped"]:
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= int(self.t.max_bad_steps):
                raise NonFiniteLossError(
                    f"{self.bad_in_a_row} consecutive optimizer steps were skipped for non-finite losses or "
                    f"gradients (step {self.step}); "
                    "stopping. The weights and the last checkpoint hold no poisoned update."
                )
        else:
            self.bad_in_a_row = 0

    @staticmethod
    def _postfix(metrics: dict) -> dict:
        short = {k.split("/")[0][:3]: f"{v:.3f}" for k, v in metrics.items() if k.endswith("/loss")}
        short["lr"] = f"{metrics['lr']:.2e}"
        short["sps"] = f"{metrics['samples_per_s']:.2f}"
        return short

    def _log(self, metrics: dict, split: str) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{split}/{k}", v, self.step)
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"split": split, "step": self.step, **metrics}, ensure_ascii=False) + "\n")

    def _log_layout_images(self) -> None:
        import numpy as np
        from PIL import Image

        from gill.training.validation import render_validation_images

        paths = render_validation_images(
            self.model, next(iter(self.val_loader)), self.output_dir / "val_images", self.step,
            max_images=int(self.t.val_images), steps=int(self.t.val_image_steps),
        )
        for i, path in enumerate(paths):
            image = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"val/layout_{i}", image, self.step, dataformats="HWC")

    def validate(self) -> None:
        """Rank 0 evaluates (forward only, no collectives) while the other ranks wait."""
        if distributed.is_main():
            from gill.training.validation import evaluate

            metrics, captions = evaluate(self.model, self.val_loader, self.t)
            self._log(metrics, "val")
            for i, (ref, hyp) in enumerate(captions):
                self.writer.add_text(f"val/caption_{i}", f"ref: {ref}  \nout: {hyp}", self.step)
            if int(self.t.val_images) > 0 and "generation" in self.modes:
                self._log_layout_images()
            log.info("validation at step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        distributed.barrier()
