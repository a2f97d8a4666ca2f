"""``torch.profiler`` over chosen training steps (``train.profile``), on every rank.

Writes ``<output_dir>/profile/rank<r>.txt`` (operators by self CPU and by self GPU time) and
``rank<r>.trace.json`` (a Chrome / Perfetto trace): a multi-GPU run's ranks side by side show where a
step waits — collectives, host-to-device copies, the CPU optimizer — which averages cannot.
The text file ends with the GPU timeline read back from the trace (:func:`timeline_report`): how long the
GPU sat idle and what the host was doing meanwhile (the ``gill.*`` labels of the training step), and which
calls made the host wait for the GPU. For a trace written elsewhere::

    python -m gill.tools.profiling outputs/run/profile/rank0.trace.json
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
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
        trace = self.out_dir / f"rank{self.rank}.trace.json"
        self._prof.export_chrome_trace(str(trace))
        text = profile_tables(self._prof, self.device, title) + "\n\n" + timeline_report(trace)
        (self.out_dir / f"rank{self.rank}.txt").write_text(text, encoding="utf-8")
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out_dir)
        self._prof = None


# ---- the GPU timeline of a trace ----------------------------------------------------------------------------
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Runtime calls that block the host until the GPU (or a copy) has finished.
WAITING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                 "cudaMemcpyAsync")


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _innermost(spans: list[dict], t: float, tid=None) -> str:
    """The name of the shortest span (of one thread, if given) that contains time ``t``; "-" if none."""
    best = None
    for e in spans:
        if e["ts"] <= t <= e["ts"] + e["dur"] and (tid is None or e["tid"] == tid):
            if best is None or e["dur"] < best["dur"]:
                best = e
    return best["name"] if best else "-"


def timeline(events: list[dict], min_gap_us: float = 100.0, min_wait_us: float = 50.0) -> dict | None:
    """GPU busy time, idle gaps by the host's ``gill.*`` label, and host waits, from Chrome-trace events (µs).

    None when the trace holds no GPU activity (a CPU run)."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = _merged([(e["ts"], e["ts"] + e["dur"]) for e in complete if e.get("cat") in GPU_CATEGORIES])
    if not gpu:
        return None
    labels = [e for e in complete if e.get("cat") == "user_annotation" and e["name"].startswith("gill.")]
    window = [e for e in complete if e.get("cat") in ("cpu_op", "user_annotation")] or complete
    start = min(e["ts"] for e in window)
    end = max(e["ts"] + e["dur"] for e in window)
    busy = sum(b - a for a, b in gpu)
    idle_by = defaultdict(lambda: [0.0, 0])
    for (_, prev_end), (next_start, _) in zip(gpu, gpu[1:]):
        if next_start - prev_end >= min_gap_us:
            row = idle_by[_innermost(labels, prev_end)]
            row[0] += next_start - prev_end
            row[1] += 1
    waits = defaultdict(lambda: [0.0, 0])
    ops = [e for e in complete if e.get("cat") == "cpu_op"]
    for e in complete:
        if e.get("cat") == "cuda_runtime" and e["name"] in WAITING_CALLS and e["dur"] >= min_wait_us:
            op = _innermost(ops, e["ts"], e["tid"])
            row = waits[(_innermost(labels, e["ts"]), op, e["name"])]
            row[0] += e["dur"]
            row[1] += 1
    return dict(wall_us=end - start, busy_us=busy, idle_by=dict(idle_by), waits=dict(waits))


def timeline_report(trace_path: Path, rows: int = 25) -> str:
    """:func:`timeline` of a Chrome trace as text."""
    t = timeline(json.loads(Path(trace_path).read_text(encoding="utf-8"))["traceEvents"])
    if t is None:
        return "## GPU timeline\n\nno GPU activity in the trace"
    idle = sum(v[0] for v in t["idle_by"].values())
    lines = ["## GPU timeline", "",
             f"profiled wall time {t['wall_us'] / 1e3:.1f} ms; GPU busy {t['busy_us'] / 1e3:.1f} ms "
             f"({100 * t['busy_us'] / t['wall_us']:.1f}%); idle gaps >= 0.1 ms: {idle / 1e3:.1f} ms", "",
             "GPU idle, by what the host was doing when the GPU ran dry (the step's gill.* label):", "",
             "| host label | idle ms | gaps |", "|---|---:|---:|"]
    for name, (us, n) in sorted(t["idle_by"].items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {name} | {us / 1e3:.1f} | {n} |")
    lines += ["", "The host waiting for the GPU (synchronising runtime calls >= 0.05 ms):", "",
              "| host label | operator | call | wait ms | calls |", "|---|---|---|---:|---:|"]
    for (label, op, call), (us, n) in sorted(t["waits"].items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {label} | {op} | {call} | {us / 1e3:.1f} | {n} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The GPU timeline of a torch.profiler Chrome trace.")
    ap.add_argument("trace", type=Path, help="a Chrome trace (e.g. <output_dir>/profile/rank0.trace.json)")
    path = ap.parse_args(argv).trace
    try:
        print(timeline_report(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a Chrome trace with traceEvents ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    main()
