"""Process-group plumbing for every launcher: ``python``, ``deepspeed`` and ``torchrun``.

Ranks come from the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); the ``--local_rank``
argument the ``deepspeed`` launcher appends is stripped before Hydra parses the command line
(Hydra would reject it). A plain ``python train_ds.py`` becomes a one-rank group.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (exporting it as LOCAL_RANK)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def free_port() -> int:
    """A free local TCP port (a rendezvous port for a one-process group or a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: torch.device) -> None:
    """Join (or, for a single process, create) the default process group."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, indexed by rank (on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (ranks must agree on control flow)."""
    return any_rank_each(flag)[0]


def any_rank_each(*flags: bool) -> list[bool]:
    """:func:`any_rank` of several flags in one all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together, at the end of a launched run: a rank that exits with the
    backend's threads still alive can abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        barrier()
        _unlink_cpu_allreduce_buffer()
        dist.destroy_process_group()


def _unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce (``deepspeed/ops/csrc/cpu/comm/shm.cpp``, 0.19) creates a shared-memory
    buffer per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never
    unlinks it: 66 MB per rank left behind by every CPU run, until /dev/shm is full. After the last barrier no
    rank opens it again (those that mapped it keep their mapping), so each rank removes its own name."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def exit_now(code: int = 0) -> None:
    """End a finished run's process without interpreter teardown, after flushing logs and streams.

    Everything the run writes is closed by then (checkpoints, metrics, TensorBoard) and the group is left.
    What remains is the interpreter freeing native objects in arbitrary order, where a backend thread that
    outlived the group can abort the process ("terminate called without an active exception", seen once
    on a 2-rank CPU run after its last checkpoint) and turn a finished run into a failed exit status.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _collective_device() -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def identical_across_ranks(module: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical trainable parameters (a data-parallel invariant)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return len(set(all_gather_object(h.hexdigest()))) == 1
