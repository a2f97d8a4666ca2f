"""Weight-only int8 for the frozen ChatGLM3 (``model.quantize.text_encoder=int8``).

Why: on a 24 GiB card the frozen bf16 weights (ChatGLM3 11.6 GiB + UNet 4.8 GiB) leave room for
micro-batch 4, where the step is bound by the host, not the GPU (benchmarks/NOTES.md). The 28
transformer layers' linears hold 5.7B of ChatGLM's 6.2B parameters; in int8 they free 5.3 GiB.

What: each ``nn.Linear`` of ChatGLM's transformer layers keeps its weight as int8 with one fp32 scale
per output row (``int8``: symmetric absmax, the numerics of torchao's ``quantize_int8_rowwise``) or per
128 input columns of a row (``int8-g128``, +3% bytes for the scales). Forward and
backward dequantize the weight to the activation dtype and run the ordinary GEMM. The weight is
frozen, so backward returns the input's gradient only and saves nothing but the int8 weight — the
structure of torchao's ``LinearNF4`` (QLoRA), at 8 bits. The library's int8 paths do not fit a
frozen weight that gradients must pass through: ``Int8WeightOnlyConfig`` has no backward, and the
prototype ``Int8QuantizedTrainingLinearWeight`` computes a weight gradient and saves the input.

Kept in bf16: the word embeddings (the ``[IMG]`` rows are renormalised to their mean norm) and the LM
head (captioning's and GILL's cross-entropy read it directly). Quality on a fixed batch against bf16:
``benchmarks/quantization_guard.py`` (every mode's loss within 1%, adapter gradient cosine >= 0.99).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# scheme -> (input columns per scale, None: one scale for the whole row; which layer parts, None: all).
# "-mlp": only the MLP linears (82% of the layers' weight bytes), attention stays bf16.
SCHEMES = {"int8": (None, None), "int8-g128": (128, None), "int8-mlp": (None, "mlp"), "int8-g128-mlp": (128, "mlp")}


@torch.no_grad()
def quantize_int8(weight: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [out, in], fp32 scale [out, in / group])``: symmetric absmax per row, or per `group` input
    columns of a row (a tighter range where one outlier would coarsen the whole row)."""
    out, inp = weight.shape
    g = min(group or inp, inp)  # a row shorter than a group is one group
    if inp % g:
        raise ValueError(f"{inp} input columns do not split into groups of {g}")
    w = weight.view(out, inp // g, g)
    scale = (w.abs().amax(dim=2).float() / 127).clamp(min=1e-12)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for i in range(0, out, 4096):
        # in row blocks: an fp32 copy of a whole 27392 x 4096 weight would be another 428 MiB on the card
        rows = slice(i, i + 4096)
        q[rows] = (w[rows].float() / scale[rows, :, None]).round().clamp(-127, 127).to(torch.int8).view(-1, inp)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # int8 values are exact in bf16/fp16; the product is rounded once, like the original weight was.
    out, inp = q.shape
    groups = scale.shape[1]
    return (q.view(out, groups, inp // groups).to(dtype) * scale.to(dtype)[:, :, None]).view(out, inp)


class _FrozenInt8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return grad @ dequantize(q, scale, grad.dtype), None, None, None


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with an int8 weight; gradients flow to its input only."""

    def __init__(self, linear: nn.Linear, group: int | None = None):
        super().__init__()
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError("only frozen linear layers can be quantized (the int8 weight gets no gradient)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight, group)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)  # fp32: DeepSpeed casts parameters to bf16, not buffers
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenInt8Linear.apply(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        group = self.in_features // self.scale.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, {group} columns per scale"


def quantize_linears(root: nn.Module, scheme: str = "int8") -> int:
    """Replace every ``nn.Linear`` under ``root`` (under submodules named as the scheme's part, if it
    has one) in place; returns how many were replaced."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {list(SCHEMES)} (or null)")
    group, part = SCHEMES[scheme]
    scopes = [m for name, m in root.named_modules() if name.split(".")[-1] == part] if part else [root]
    # Names, not modules: each bf16 weight is freed as soon as its int8 copy replaces it, so the peak
    # is the quantized model plus one layer's weight (a 24 GiB card loads ChatGLM this way).
    targets = [(parent, name) for scope in scopes for parent in scope.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name), group))
    return len(targets)


def quantize_text_encoder(text_encoder: nn.Module, scheme: str | None) -> int:
    """ChatGLM's transformer layers (not the embeddings, not the LM head) in `scheme`; None: untouched."""
    if not scheme:
        return 0
    return quantize_linears(text_encoder.encoder, scheme)


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (int8 weights count one byte each)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
