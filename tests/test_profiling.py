"""The GPU timeline read back from a profiler trace: busy time, idle gaps by the step's label, host waits."""
import json

import pytest

from gill.tools.profiling import main, timeline, timeline_report


def ev(cat, name, ts, dur, tid=1, pid=1):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid, pid=pid)


def test_idle_gaps_are_charged_to_the_label_the_host_was_in_and_waits_to_their_operator(tmp_path, capsys):
    events = [
        ev("user_annotation", "gill.forward.generation", 0, 1000),
        ev("user_annotation", "gill.backward.generation", 1000, 1000),
        ev("cpu_op", "aten::is_nonzero", 900, 90),
        ev("cpu_op", "aten::_local_scalar_dense", 910, 70),
        ev("cuda_runtime", "cudaStreamSynchronize", 920, 60),
        ev("cuda_runtime", "cudaLaunchKernel", 100, 5),
        # GPU: busy 0-400 and 350-600 (overlapping streams), idle 600-1500 (host in forward), busy 1500-1900
        ev("kernel", "k1", 0, 400, tid=7, pid=0),
        ev("kernel", "k2", 350, 250, tid=8, pid=0),
        ev("kernel", "k3", 1500, 400, tid=7, pid=0),
        ev("kernel", "k4", 1950, 40, tid=7, pid=0),  # a 50 µs gap: under the threshold
    ]
    t = timeline(events)
    assert t["wall_us"] == 2000 and t["busy_us"] == 600 + 400 + 40
    assert t["idle_by"] == {"gill.forward.generation": [900.0, 1]}
    assert t["waits"] == {("gill.forward.generation", "aten::_local_scalar_dense", "cudaStreamSynchronize"): [60.0, 1]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    report = timeline_report(path)
    assert "GPU busy 1.0 ms (52.0%)" in report and "| gill.forward.generation | 0.9 | 1 |" in report
    main([str(path)])  # python -m gill.tools.profiling <trace>
    assert capsys.readouterr().out.strip() == report
    (tmp_path / "table.txt").write_text("# rank 0, optimizer steps 40-40")
    with pytest.raises(SystemExit, match="not a Chrome trace"):
        main([str(tmp_path / "table.txt")])
    assert timeline([ev("cpu_op", "aten::mm", 0, 10)]) is None  # a CPU run has no GPU timeline
