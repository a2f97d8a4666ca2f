"""Shared pytest fixtures: the tiny frozen Kolors stack, built once per test session.

`tiny_stack_dir` builds the tiny diffusers-format directory (gill.tiny_stack) into a session tmp dir
through the same race-safe cache path production uses; `tiny_stack` loads it back with
`gill.stack.load_stack` (fp32, CPU) exactly as a real Kolors directory would be loaded.
"""
import pytest
import torch

torch.set_num_threads(1)  # tests run on small, shared CPU boxes: 2 OpenMP threads thrash there


@pytest.fixture(scope="session")
def tiny_stack_dir(tmp_path_factory) -> str:
    from gill.stack import ensure_tiny_stack
    from gill.tiny_stack import TINY_VERSION

    return ensure_tiny_stack(str(tmp_path_factory.mktemp("gill-cache") / f"tiny-{TINY_VERSION}"))


@pytest.fixture(scope="session")
def tiny_stack(tiny_stack_dir):
    from gill.stack import load_stack

    return load_stack({"name": "tiny", "pretrained_path": tiny_stack_dir, "dtype": "fp32"}, device="cpu")
