"""``torch.profiler`` over chosen training steps (``train.profile``), on every rank.

Writes ``<output_dir>/profile/rank<r>.txt`` (operators by self CPU and by self GPU time) and
``rank<r>.trace.json`` (a Chrome / Perfetto trace): a multi-GPU run's ranks side by side show where a
step waits — collectives, host-to-device copies, the CPU optimizer — which averages cannot.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def profile_tables(prof, device: torch.device, title: str, rows: int = 40) -> str:
    """The profiler's operator averages as two tables: by self CPU time and by self GPU time."""
    avg = prof.key_averages()
    gpu_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return "\n".join([
        f"# {title}", "", "## by self CPU time", avg.table(sort_by="self_cpu_time_total", row_limit=rows),
        "", "## by self GPU time", avg.table(sort_by=gpu_key, row_limit=rows),
    ])


def make_profiler(device: torch.device):
    """A ``torch.profiler.profile`` of CPU activity, and of the GPU's when ``device`` is one."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


class StepProfiler:
    """Profiles optimizer steps ``first .. first + count - 1`` (1-based, as the trainer counts them)."""

    def __init__(self, first: int | None, count: int, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (first, first + max(1, count) - 1) if first else (None, None)
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self._prof = None

    def covers(self, step: int) -> bool:
        return self.first is not None and self.first <= step <= self.last

    def before_step(self, step: int) -> None:
        if step == self.first:
            self._prof = make_profiler(self.device)
            self._prof.start()

    def after_step(self, step: int) -> None:
        if self._prof is not None and step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the profile, if one is running (also for a run that ends inside the window)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        title = f"rank {self.rank}, optimizer steps {self.first}-{self.last}"
        (self.out_dir / f"rank{self.rank}.txt").write_text(profile_tables(self._prof, self.device, title), encoding="utf-8")
        self._prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json"))
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out_dir)
        self._prof = None
