"""Shared pytest fixtures: the tiny frozen Kolors stack, built once per pytest run.

`tiny_stack_dir` builds the tiny diffusers-format directory (gill.models.tiny_stack) into a tmp dir of the run
through the same race-safe cache path production uses; `tiny_stack` loads it back with
`gill.models.stack.load_stack` (fp32, CPU) exactly as a real Kolors directory would be loaded.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Tests run on small, shared CPU boxes, where 2 OpenMP threads thrash: 1 by default. GILL_TEST_THREADS=N runs the
# suite with N threads (other CPU kernels: tolerances must hold there too, see docs/testing.md).
torch.set_num_threads(int(os.environ.get("GILL_TEST_THREADS", "1")))


def tiny_model(stack_dir, **overrides):
    """A fresh ``GillModel`` on its own copy of the tiny stack (the spatial adapter hooks into the UNet it is
    given), seeded; ``overrides`` are dotted keys of conf/model/tiny.yaml. Returns the model and its config."""
    from omegaconf import OmegaConf

    from gill.models.model import GillModel
    from gill.models.stack import load_stack

    cfg = OmegaConf.load(ROOT / "conf/model/tiny.yaml")
    cfg.pretrained_path = stack_dir
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    stack = load_stack(cfg, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    return GillModel(stack, cfg), cfg


@pytest.fixture(scope="session")
def tiny_stack_dir(tmp_path_factory) -> str:
    from gill.models.stack import ensure_tiny_stack
    from gill.models.tiny_stack import TINY_VERSION

    return ensure_tiny_stack(str(tmp_path_factory.mktemp("gill-cache") / f"tiny-{TINY_VERSION}"))


def launch_args(tmp_path, *extra, script: str = "train_1gpu.sh") -> list[str]:
    """The arguments ``launch/<script>`` hands to `deepspeed` (benchmarks/step_benchmark.py records them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_benchmark import launch_script_args

    return launch_script_args(*extra, script=script)


@pytest.fixture(scope="session")
def ci_standin(tmp_path_factory) -> Path:
    """The grounding benchmark's ``ci`` stand-in stack (a tiny stack whose ChatGLM and CLIP tower are pretrained on
    the synthetic captions and images; ~2.5 min on one CPU thread), built once; its parent is the benchmark's work
    folder, where the benchmark finds and reuses it."""
    from gill.bench.grounding import build_standin
    from gill.bench.grounding_presets import PRESETS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_standin(tmp_path_factory.mktemp("grounding-bench"), PRESETS["ci"], torch.device("cpu"))[0]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_stack(tiny_stack_dir):
    from gill.models.stack import load_stack

    return load_stack({"name": "tiny", "pretrained_path": tiny_stack_dir, "dtype": "fp32"}, device="cpu")


@pytest.fixture
def child_env() -> dict:
    """Environment for a training run in a child process: its own process group, so none of the
    rendezvous variables an in-process test set (they would point it at this process's port)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack to the captured stderr.
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    return env


@pytest.fixture
def free_port() -> int:
    """A free TCP port for a launcher's rendezvous (torchrun's --master_port=0 hangs on a static rendezvous)."""
    from gill.training.distributed import free_port as pick

    return pick()
