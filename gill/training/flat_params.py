"""One flat trainable tensor for a module whose parameters are many small tensors.

Why: DeepSpeed ZeRO-2 does Python and small-kernel work *per parameter* in every backward and every
step (gradient hooks, bucket copies, CPU-offload accumulators, norm bookkeeping). The adapter is
~600 tensors at Kolors scale, and at micro-batch 1 that per-parameter work cost more than the
model's compute (benchmarks/step_benchmark.md). Flattened, DeepSpeed sees one parameter.

How: the trainable parameters are concatenated into one ``nn.Parameter`` registered on the module
(as ``flat``); each original parameter is removed from its owner and replaced by a plain tensor
attribute that is a *view* of ``flat`` (so ``nn.Linear`` & co. work unchanged and gradients flow
into ``flat``). Views are re-created by :meth:`FlatParameters.refresh` at the start of each forward
(every graph gets its own) and after ``.to()``; gradient-checkpoint recomputation in the backward
reuses that forward's views. ``state_dict()`` / ``load_state_dict()`` keep the original names and
shapes, so checkpoints and the exported ``adapter.safetensors`` look exactly as without flattening.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FLAT = "flat"


@dataclass(frozen=True)
class _Slot:
    name: str  # qualified name inside the flattened module, e.g. "mapper.proj_in.weight"
    owner: nn.Module
    attr: str
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatParameters:
    """Flattens ``module``'s trainable parameters in place; kept as ``module.flat_params``."""

    def __init__(self, module: nn.Module):
        if hasattr(module, FLAT):
            raise ValueError(f"{type(module).__name__} already has an attribute {FLAT!r}")
        named = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad]
        if not named:
            raise ValueError("nothing to flatten: the module has no trainable parameters")
        if len({id(p) for _, p in named}) != len(named):
            raise ValueError("shared (tied) parameters cannot be flattened: each view would train separately")
        kinds = {(p.dtype, p.device) for _, p in named}
        if len(kinds) != 1:
            raise ValueError(f"parameters of one dtype and device only, got {sorted(map(str, kinds))}")
        self.module = module
        self.slots: list[_Slot] = []
        for name, p in named:
            owner_name, _, attr = name.rpartition(".")
            self.slots.append(_Slot(name, module.get_submodule(owner_name), attr, p.shape))
        self._numels = [s.numel for s in self.slots]
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in named]))
        for slot in self.slots:
            del slot.owner._parameters[slot.attr]
        module.register_parameter(FLAT, flat)
        # torch marks hooks with an attribute, which a bound method cannot take: wrap them.
        module.register_state_dict_post_hook(lambda *args: self._state_dict_hook(*args))
        module.register_load_state_dict_pre_hook(lambda *args: self._load_state_dict_hook(*args))
        self.refresh()

    def refresh(self) -> None:
        """Point every owner's attribute at a fresh view of the current ``flat``."""
        # One split, not a slice per parameter: the backward of a slice materialises a zero tensor
        # of the full flat size, so 600 slices cost 600x the adapter per backward; split's
        # backward concatenates all the pieces' gradients once.
        for s, piece in zip(self.slots, torch.split(getattr(self.module, FLAT), self._numels)):
            object.__setattr__(s.owner, s.attr, piece.view(s.shape))

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector (weights, gradients, master copy) -> ``{original name: tensor}``."""
        if flat.numel() != sum(self._numels):
            raise ValueError(f"expected {sum(self._numels)} elements, got {flat.numel()}")
        pieces = torch.split(flat.reshape(-1), self._numels)
        return {s.name: piece.view(s.shape) for s, piece in zip(self.slots, pieces)}

    def expand(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replace the ``flat`` entry of a name -> tensor dict by the original names."""
        out = {k: v for k, v in state.items() if k != FLAT}
        out.update({k: v.contiguous() for k, v in self.split(state[FLAT]).items()})
        return out

    # ---- state dict: original names in, original names out ----------------------------------------
    def _state_dict_hook(self, module, state_dict, prefix, local_metadata):
        flat = state_dict.pop(prefix + FLAT)
        for name, view in self.split(flat).items():
            state_dict[prefix + name] = view

    def _load_state_dict_hook(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        keys = [prefix + s.name for s in self.slots]
        if prefix + FLAT in state_dict or not all(k in state_dict for k in keys):
            return  # a missing name leaves `flat` missing: load_state_dict reports it
        for k, s in zip(keys, self.slots):
            if tuple(state_dict[k].shape) != tuple(s.shape):
                errors.append(f"size mismatch for {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(s.shape)}")
                return
        state_dict[prefix + FLAT] = torch.cat([state_dict.pop(k).reshape(-1).to(getattr(module, FLAT).dtype) for k in keys])
