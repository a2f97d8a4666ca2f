"""Regional ``torch.compile`` of the frozen stack's repeated blocks (``model.compile``).

Compiled: each ChatGLM layer (``GLMBlock``), each UNet resnet (``ResnetBlock2D``), and each UNet
transformer block (``BasicTransformerBlock``) whole — norms, attention, feed-forward and the spatial
adapter's cross injection in one graph (``model.compile_blocks``) — or, with ``compile_blocks=false`` or
the ``self`` injection, its attention and feed-forward modules one by one (the injections then compiled
on their own with ``model.compile_adapter``). Their ``forward`` is replaced on the instance, so a
module's own hooks run outside its graph, and the hooks of its children inside. Modules are graph
inputs, so same-class regions share a handful of compiled graphs — as long as a traced hook does not
close over its block (the cross injection's hook is one object for all blocks: a hook per block made
a graph per block, tests/test_model.py).

Whole blocks, measured on the 24 GiB recipe (benchmarks/NOTES.md, run 20): 338 compiled calls per step
instead of 758, the host's time per step 2.02 s instead of 2.21 s (profiled), 1.125 s per step instead of
1.229 s (+6.2% samples/s in the same run).

Why: at Kolors scale the eager step is bound by Python and kernel launches, not by the GPU
(benchmarks/step_benchmark.md: 48% MFU compiled vs 37% eager at micro-batch 20; 3.3 vs 2.3
samples/s at micro-batch 4 under a 24 GiB cap).

Shapes are *not* static: ChatGLM's sequence length changes with every batch of captions, and the
number of phrases to encode with every layout. Compiled with ``dynamic=False`` each new length was a
new graph — a 3-GPU Kolors run spent 98, 17, 15, 8, 17 s on its first five steps
(benchmarks/scaling.md), and the tiny stack recompiled in 6 of 8 steps. PyTorch's automatic dynamic
shapes (``dynamic=None``) recompile a region once with symbolic sizes when a size changes: the tiny
stack then compiled once more in 8 steps (a 1-object layout: sizes 0 and 1 are always specialised).
ChatGLM's layers are compiled with symbolic sizes from the start (``dynamic=True``): their sequence
length and batch differ on nearly every call, so the first, static graph would only be thrown away.
"""
from __future__ import annotations

import torch
from torch import nn

REGIONS = ("GLMBlock", "ResnetBlock2D")
# The spatial adapter's injections (``model.compile_adapter``): trainable, one per UNet transformer block
# (70 at Kolors scale), each ~15 small kernels per call when eager. Same-class layers share graphs.
ADAPTER_REGIONS = ("GatedCrossAttention", "GatedSelfAttention")
# torch.compile's `dynamic` per region class; None (automatic) otherwise. The adapter's injections stay automatic:
# with every size symbolic, duck sizing ties the object count to the batch whenever they happen to be equal (one more
# graph mid-run); instead their grounding tokens' object axis is marked dynamic where they are made
# (SpatialAdapter.set_layout), and the token grid turns symbolic at the second grid size, in the first call.
DYNAMIC = {"GLMBlock": True}
# torch.compile mode of every region (None: the default). "reduce-overhead" adds CUDA graphs: measured
# as a benchmark variant only (benchmarks/step_benchmark.py, "-ro" rows), not a config option yet.
MODE: str | None = None
# Compiled piecewise unless the class itself is a region: a UNet transformer block as a whole (``model.compile_blocks``)
# is one graph with its norms and the spatial adapter's cross injection inside, instead of three graphs and eager
# glue; its hook is one object for every block (SpatialAdapter.attach), so blocks of one shape share graphs.
BLOCK_REGIONS = ("BasicTransformerBlock",)
SUBMODULES_OF = {"BasicTransformerBlock": ("attn1", "attn2", "ff")}


def compile_regions(*roots: nn.Module, regions: tuple[str, ...] = REGIONS) -> list[nn.Module]:
    """Compile the ``regions`` (class names) under ``roots`` in place; returns the modules whose forward
    was replaced (``del module.forward`` restores the eager one)."""
    import torch._dynamo.config as dynamo_config

    # One cached graph per (region class, input shapes): more than the default 8 with 3 modes.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    targets = []
    for root in roots:
        for m in root.modules():
            kind = type(m).__name__
            if kind in regions:
                targets.append(m)
            elif kind in SUBMODULES_OF:
                targets.extend(getattr(m, name) for name in SUBMODULES_OF[kind])
    for m in targets:
        m.forward = torch.compile(m.forward, dynamic=DYNAMIC.get(type(m).__name__), mode=MODE)
    return targets
