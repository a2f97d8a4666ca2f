"""Weight-only int8 ChatGLM (``model.quantize.text_encoder=int8``): the frozen linear's arithmetic and what
it keeps for backward, the stack and the planner reading it, the quality guard, and seeded ``kolors_random``
(the real trainer's benchmark rows train it from an encoder cache)."""
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_model

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_int8_linear_matches_its_dequantized_weight_and_passes_gradients_to_the_input_only():
    from gill.models.quantize import Int8Linear, dequantize, quantize_int8

    torch.manual_seed(0)
    lin = nn.Linear(64, 48).requires_grad_(False)
    lin.weight[3].mul_(50)  # one row with a far larger range: per-row scales keep the others precise
    q, scale = quantize_int8(lin.weight)
    assert q.dtype == torch.int8 and scale.shape == (48, 1) and q.abs().max() == 127
    w = dequantize(q, scale, torch.float32)
    err = (w - lin.weight).abs().amax(dim=1)
    assert torch.all(err <= scale[:, 0] / 2 + 1e-7)  # round to nearest: at most half a step per row
    assert err[0] < err[3] / 10

    qlin = Int8Linear(lin)
    x = torch.randn(5, 7, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlin(x)
    torch.testing.assert_close(y, nn.functional.linear(x, w, lin.bias))
    assert all(t.dtype == torch.int8 or t.data_ptr() == qlin.scale.data_ptr() for t in saved), "the input is not kept"
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w)
    assert not any(p.requires_grad for p in qlin.parameters())

    with pytest.raises(ValueError, match="only frozen"):
        Int8Linear(nn.Linear(4, 4))

    # per 16 input columns (int8-g128 at Kolors scale): an outlier coarsens only its group
    lin.weight[5, 0] = 100.0
    qg, sg = quantize_int8(lin.weight, 16)
    assert sg.shape == (48, 4)
    row_err = (dequantize(*quantize_int8(lin.weight), torch.float32) - lin.weight)[5, 16:].abs().max()
    assert (dequantize(qg, sg, torch.float32) - lin.weight)[5, 16:].abs().max() < row_err / 10
    assert Int8Linear(lin, 16)(x).shape == y.shape


def test_quantized_text_encoder_loads_trains_and_is_planned_in_int8(tiny_stack_dir):
    from gill.models.quantize import Int8Linear, frozen_bytes
    from gill.tools.plan import frozen_modules

    model, cfg = tiny_model(tiny_stack_dir, **{"quantize.text_encoder": "int8"})
    te = model.text_encoder
    linears = [m for m in te.encoder.modules() if isinstance(m, Int8Linear)]
    assert linears and not any(type(m) is nn.Linear for m in te.encoder.modules())
    assert type(te.output_layer) is nn.Linear  # the LM head stays as loaded
    plain, _ = tiny_model(tiny_stack_dir)
    int8_weights, scales = sum(m.qweight.numel() for m in linears), sum(m.scale.numel() for m in linears)
    # fp32 stack: 4 -> 1 byte per quantized weight, plus an fp32 scale per output row
    assert frozen_bytes(plain.text_encoder) - frozen_bytes(te) == 3 * int8_weights - 4 * scales

    # the planner counts the same bytes
    planned = frozen_modules(cfg, torch.float32)["text_encoder"]
    assert frozen_bytes(planned) == frozen_bytes(te)

    from gill.data.collate import collate_layout
    from gill.data.synthetic import SyntheticLayoutDataset

    ds = SyntheticLayoutDataset(2, resolution=64, seed=0)
    batch = collate_layout([ds[0], ds[1]])
    model.train()
    for mode in ("captioning", "retrieval", "generation"):
        model.seed(0)
        loss = model(batch, mode)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    assert model.adapter.img_tokens.grad is not None and model.adapter.img_tokens.grad.abs().sum() > 0


def test_mlp_schemes_quantize_the_mlp_linears_only(tiny_stack_dir):
    from gill.models.quantize import Int8Linear

    model, _ = tiny_model(tiny_stack_dir, **{"quantize.text_encoder": "int8-g128-mlp"})
    for layer in model.text_encoder.encoder.layers:
        assert all(isinstance(m, Int8Linear) for m in (layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h))
        assert type(layer.self_attention.query_key_value) is nn.Linear and type(layer.self_attention.dense) is nn.Linear


def test_quality_guard_on_the_tiny_stack_and_a_broken_quantizer_fails_it(monkeypatch):
    """benchmarks/quantization_guard.py: int8 passes on the tiny stack; a quantizer that loses the
    per-row scale (one scale for the whole matrix, rounded to a power of two) fails it."""
    from hydra import compose, initialize_config_dir
    from quantization_guard import fmt, guard

    import gill.models.quantize as qz

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["model=tiny"])
    good = guard(cfg, "int8", 2, 64, torch.device("cpu"), torch.float32)
    assert good["ok"], fmt(good)
    assert all(r["loss_rel_diff"] < 0.01 and r["grad_cosine"] > 0.99 for r in good["rows"])

    def coarse(weight, group=None):
        scale = torch.full((weight.shape[0], 1), 2.0 ** torch.ceil(torch.log2(weight.abs().max() / 4)).item())
        return (weight / scale).round().clamp(-127, 127).to(torch.int8), scale

    monkeypatch.setattr(qz, "quantize_int8", coarse)
    bad = guard(cfg, "int8", 2, 64, torch.device("cpu"), torch.float32)
    assert not bad["ok"], fmt(bad)


def test_moving_the_model_forgets_text_encodings_made_before(tiny_stack_dir):
    model, _ = tiny_model(tiny_stack_dir)
    empty = model.empty_prompt()
    assert model.empty_prompt() is empty  # cached
    model.to(torch.float64)
    assert model.empty_prompt()[0].dtype == torch.float64


@pytest.mark.slow  # two CLIP-L towers built on the CPU: ~15 s
def test_seeded_kolors_random_components_are_reproducible_and_independent():
    """The cache builder builds only the VAE and the vision tower: each must come out as in the full stack."""
    from gill.models.stack import build_random_modules

    def first_weight(name, **kw):
        return next(iter(build_random_modules("cpu", torch.float32, **kw)[name].state_dict().values()))

    alone = first_weight("vision", seed=0, only=("vision",))
    assert torch.equal(alone, first_weight("vision", seed=0, only=("vae", "vision")))  # the VAE drew first
    assert not torch.equal(first_weight("vae", seed=0, only=("vae",)), first_weight("vae", seed=1, only=("vae",)))


def test_encoder_cache_of_seeded_kolors_random_is_keyed_by_its_seed():
    from omegaconf import OmegaConf

    from gill.data.encoder_cache import CacheError, describe_model

    cfg = OmegaConf.create({"name": "kolors_random", "seed": 0})
    assert describe_model(cfg)["seed"] == 0 and describe_model(cfg) != describe_model(OmegaConf.create({"name": "kolors_random", "seed": 1}))
    with pytest.raises(CacheError, match="model.seed"):
        describe_model(OmegaConf.create({"name": "kolors_random", "seed": None}))
