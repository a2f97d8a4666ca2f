"""What a run used, per rank: peak accelerator memory, the optimizer's state and where it lives, host RSS.

The trainer reports it at the end of training (metrics.jsonl's ``final`` record, one entry per rank), so a
multi-GPU run shows ZeRO's partitioning in numbers: with ZeRO-2 each rank keeps only its share of the fp32
master weights, their gradients and Adam's moments (on the CPU with the offloaded optimizer).
"""
from __future__ import annotations

import resource

import torch

GiB = 2**30


def cap_gpu_memory(device: torch.device, cap_gib: float | None) -> float | None:
    """Emulate a smaller card: cap PyTorch's allocator on ``device`` at ``cap_gib`` GiB (e.g. 24 for an
    RTX 4090 on a larger GPU); None or 0 lifts the cap. Returns the fraction of the device set (None off
    the GPU)."""
    if device.type != "cuda":
        return None
    # torch 2.11 refuses torch.device("cuda") without an index here ("Expected a cuda device with a
    # specified index"): resolve it to the current device.
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, float(cap_gib) * GiB / total) if cap_gib else 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def gpu_peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on ``device`` so far (None off the GPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GiB


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device.type, t.untyped_storage().data_ptr()


def optimizer_state(engine) -> dict:
    """Bytes of what the optimizer owns beyond the model's own parameters, by kind and device.

    ``master``: the fp32 copies the update is computed on (ZeRO: this rank's partition); ``grads``: their
    gradients; ``moments``: the base optimizer's per-parameter state (Adam's exp_avg / exp_avg_sq). Tensors
    that share a storage (views of one flat buffer) count once; the model's parameters do not count.
    """
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)
    own = {_storage_key(p) for p in engine.module.parameters()}
    seen: set = set()
    out: dict = {"master": {}, "grads": {}, "moments": {}}

    def add(kind: str, t) -> None:
        if not torch.is_tensor(t) or t.numel() == 0:
            return
        key = _storage_key(t)
        if key in own or key in seen:
            return
        seen.add(key)
        out[kind][t.device.type] = out[kind].get(t.device.type, 0) + t.untyped_storage().nbytes()

    for group in base.param_groups:
        for p in group["params"]:
            add("master", p)
            add("grads", p.grad)
    for state in base.state.values():
        for value in state.values():
            add("moments", value)
    return out


def rank_report(engine, device: torch.device) -> dict:
    """This rank's resource use, JSON-ready (GiB)."""
    state = optimizer_state(engine)
    by_device: dict[str, float] = {}
    for kind in state.values():
        for dev, nbytes in kind.items():
            by_device[dev] = by_device.get(dev, 0.0) + nbytes / GiB
    peak = gpu_peak_gib(device)
    return {
        "gpu_peak_gib": peak,
        "gpu_reserved_peak_gib": torch.cuda.max_memory_reserved(device) / GiB if peak is not None else None,
        "optimizer_state_gib": by_device,
        "optimizer_state_detail_gib": {k: {d: b / GiB for d, b in v.items()} for k, v in state.items()},
        # ru_maxrss is in KiB on Linux
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
