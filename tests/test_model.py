"""The adapter and the three modes on the tiny stack: exactness at init, gradient routing, shapes."""
import pytest
import torch
from omegaconf import OmegaConf

from gill.models.chatglm import encode_prompt
from gill.data.collate import collate_layout
from gill.data.synthetic import SyntheticLayoutDataset
from conftest import tiny_model

MODEL_CFG = "conf/model/tiny.yaml"


def make_model(stack_dir, **adapter_overrides):
    return tiny_model(stack_dir, **adapter_overrides)[0]


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticLayoutDataset(8, resolution=64, seed=3)
    return collate_layout([ds[i] for i in range(4)])


def unet_inputs(model, batch):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    embeds, pooled = model.prompt_encoding(batch["captions"])
    return dict(
        sample=latents,
        timestep=torch.tensor([10, 200, 500, 999]),
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": model.time_ids(batch, 64)},
    )


@pytest.mark.parametrize("injection", ["self", "cross"])
def test_adapter_reproduces_frozen_unet_exactly_at_init(tiny_stack_dir, batch, injection):
    model = make_model(tiny_stack_dir, **{"adapter.spatial.injection": injection})
    inputs = unet_inputs(model, batch)
    with torch.no_grad():
        model.adapter.spatial.clear_layout()
        plain = model.unet(**inputs).sample
        phrases = model.phrases(model, batch["labels"], batch["boxes"].shape[1])
        model.adapter.spatial.set_layout(phrases, batch["boxes"], batch["box_mask"], (16, 16))
        with_layout = model.unet(**inputs).sample
        assert torch.equal(plain, with_layout), "zero gates must leave the UNet bit-identical"
        # ...and the injection is really wired in: opening the gates changes the output.
        for layer in model.adapter.spatial.layers:
            layer.gate.fill_(0.5)
        opened = model.unet(**inputs).sample
    assert not torch.allclose(plain, opened)
    # The UNet's own state dict is untouched by the adapter (hooks, not module surgery).
    assert not any("spatial" in k or "fuser" in k for k in model.unet.state_dict())
    # Detached, the UNet is plain Kolors again: the gates open, its output is the one without a layout.
    model.adapter.spatial.detach()
    assert not any(hasattr(m, "_gill_grounding") for m in model.unet.modules())
    with torch.no_grad():
        assert torch.equal(model.unet(**inputs).sample, plain)


def test_cross_box_mask_confines_attention_to_boxes(tiny_stack_dir):
    model = make_model(tiny_stack_dir, **{"adapter.spatial.injection": "cross"})
    sa = model.adapter.spatial
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, False]])
    sa.set_layout(torch.zeros(1, 2, model.llm_dim), boxes, mask, (16, 16))
    m = sa._box_mask((8, 8))  # an 8x8 token grid
    assert m.shape == (1, 64, 3)
    grid = m[0, :, 0].view(8, 8)
    assert grid[:4, :4].all() and not grid[4:, :].any() and not grid[:, 4:].any()
    assert not m[0, :, 1].any(), "padding slots are never attended"
    assert m[0, :, 2].all(), "the null token is always visible"


def test_cross_outside_all_lets_pixels_in_no_box_see_every_object(tiny_stack_dir):
    model = make_model(tiny_stack_dir, **{"adapter.spatial.injection": "cross", "adapter.spatial.outside": "all"})
    sa = model.adapter.spatial
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True, False]])
    sa.set_layout(torch.zeros(1, 3, model.llm_dim), boxes, mask, (16, 16))
    m = sa._box_mask((8, 8))[0].view(8, 8, 4)
    assert m[:4, :4, 0].all() and not m[:4, :4, 1].any(), "inside a box: that box only"
    assert m[4:, :4, 1].all() and not m[4:, :4, 0].any()
    assert m[:, 4:, 0].all() and m[:, 4:, 1].all(), "in no box: every object"
    assert not m[..., 2].any(), "padding slots are never attended"
    assert m[..., 3].all()
    with pytest.raises(ValueError, match="outside"):
        make_model(tiny_stack_dir, **{"adapter.spatial.injection": "cross", "adapter.spatial.outside": "some"})


def test_encode_prompt_matches_kolors_pipeline(tiny_stack, tiny_stack_dir):
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_stack_dir)
    texts = ["白色背景上有一个红色圆形", "一只橘猫趴在沙发上"]
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        texts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=32
    )
    embeds, pooled = encode_prompt(pipe.text_encoder, pipe.tokenizer, texts, 32)
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)


# What each mode must (and must not) train. Everything frozen never gets a gradient.
# img_output: every LM softmax includes the [IMG] rows (GILL's resized vocabulary does); retrieval and
# generation also carry the [IMG0] target.
EXPECTED = {
    "captioning": {"visual_prefix", "img_output"},
    "retrieval": {"img_tokens", "img_output", "text_proj", "image_proj", "logit_scale"},
    "generation": {"img_tokens", "img_output", "mapper", "spatial"},
}


@pytest.mark.parametrize("injection", ["self", "cross"])
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_mode_loss_is_finite_and_only_intended_trainables_get_gradients(tiny_stack_dir, batch, mode, injection):
    model = make_model(tiny_stack_dir, **{"adapter.spatial.injection": injection, "layout_dropout": 0.0})
    # Open the gates so the spatial adapter's inner weights are on the gradient path too.
    with torch.no_grad():
        for layer in model.adapter.spatial.layers:
            layer.gate.fill_(0.1)
    out = model(batch, mode)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    frozen_with_grad = {n for n in with_grad if not n.startswith("adapter.")}
    assert not frozen_with_grad
    parts = {n.split(".")[1] for n in with_grad}
    assert parts == EXPECTED[mode]
    # Within an intended part, every parameter on the path trains (e.g. all spatial layers).
    if mode == "generation":
        spatial = [n for n, _ in model.adapter.spatial.named_parameters()]
        missing = [n for n in spatial if f"adapter.spatial.{n}" not in with_grad]
        # null embeddings only get gradient from empty slots; the null token exists only for "cross"
        assert all("null" in n for n in missing), missing


def test_captioning_loss_uses_the_visual_prefix(tiny_stack_dir, batch):
    model = make_model(tiny_stack_dir)
    base = model(batch, "captioning")["loss"].item()
    with torch.no_grad():
        model.adapter.visual_prefix.weight.mul_(5)
        model.adapter.visual_prefix.bias.add_(1)
    assert model(batch, "captioning")["loss"].item() != pytest.approx(base)


def test_modes_are_deterministic_given_the_model_seed(tiny_stack_dir, batch):
    model = make_model(tiny_stack_dir)
    model.seed(7)
    a = model(batch, "generation")["loss"]
    model.seed(7)
    b = model(batch, "generation")["loss"]
    assert torch.equal(a, b)


def test_generation_timestep_high_noise_share(tiny_stack_dir, batch, monkeypatch):
    """``timestep_high_noise``: share 1.0 draws every t from the noisier half; 0.0 (the default) is the
    uniform draw of before, from the same random stream (no extra draw)."""
    model = make_model(tiny_stack_dir)
    assert model.timestep_high_noise == 0.0
    steps = model.noise_scheduler.config.num_train_timesteps
    draws, seen = [], []
    rand = model.rand
    monkeypatch.setattr(model, "rand", lambda *shape: draws.append(rand(*shape)) or draws[-1])
    add_noise = model.noise_scheduler.add_noise
    monkeypatch.setattr(model.noise_scheduler, "add_noise", lambda x, n, t: seen.append(t) or add_noise(x, n, t))
    with torch.no_grad():
        model.seed(3)
        model(batch, "generation")
        assert len(draws) == 3  # caption dropout, t, layout dropout: as before the option
        assert torch.equal(seen[-1], (draws[1] * steps).long().clamp(max=steps - 1))
        model.timestep_high_noise = 1.0
        for seed in range(4):
            model.seed(seed)
            model(batch, "generation")
            assert (seen[-1] >= steps // 2).all() and (seen[-1] < steps).all(), seen[-1]


def test_default_spatial_adapter_fits_the_budget_at_kolors_scale():
    from gill.models.adapter import GillAdapter
    from gill.models.stack import build_random_modules

    adapter_cfg = OmegaConf.merge(
        OmegaConf.load(MODEL_CFG).adapter, OmegaConf.load("conf/model/kolors.yaml").adapter
    )
    modules = build_random_modules(device="meta", dtype=torch.bfloat16)
    with torch.device("meta"):
        adapter = GillAdapter(adapter_cfg, llm_dim=4096, vision_dim=768, prompt_len=256, unet=modules["unet"])
    groups = adapter.parameter_groups()
    spatial = groups["spatial: grounding tokenizer"] + groups["spatial: gated injections"]
    assert len(adapter.spatial.layers) == 70
    assert 20e6 < spatial <= 60e6, spatial


def mode_gradients(model, batch) -> dict:
    with torch.no_grad():
        for layer in model.adapter.spatial.layers:
            layer.gate.fill_(0.1)
    for mode in EXPECTED:
        model.seed(1)
        model(batch, mode)["loss"].backward()  # the spatial hooks must survive recomputation
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("whole_blocks", [True, False], ids=["blocks", "pieces"])
def test_regional_compile_with_checkpointing_gives_the_same_gradients(tiny_stack_dir, batch, whole_blocks):
    """model.compile (the Kolors default) with the UNet's transformer blocks compiled whole and the cross injection
    inside (``compile_blocks``, the Kolors default), or piecewise with the injections compiled on their own
    (``compile_adapter``): same gradients as eager, and the blocks share their graphs."""
    eager = mode_gradients(make_model(tiny_stack_dir), batch)
    model = make_model(tiny_stack_dir, **{"compile": True, "compile_adapter": True, "compile_blocks": whole_blocks,
                                          "gradient_checkpointing.unet": True,
                                          "gradient_checkpointing.text_encoder": True})
    kinds = {type(m).__name__ for m in model.compiled_regions}
    expected = {"BasicTransformerBlock"} if whole_blocks else {"Attention", "FeedForward", "GatedCrossAttention"}
    assert kinds == {"GLMBlock", "ResnetBlock2D"} | expected, kinds
    compiled = mode_gradients(model, batch)
    if whole_blocks:
        # 11 blocks with an injection each: a graph per block (a hook that closes over its block) would be 11 entries.
        from diffusers.models.attention import BasicTransformerBlock
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(BasicTransformerBlock.forward.__code__)
        assert 0 < len(entries) <= 3, len(entries)  # input requires_grad or not; then the token count symbolic
    assert compiled.keys() == eager.keys()
    for n in eager:
        # Inductor fuses and reorders fp32 arithmetic: ~1e-6 relative per tensor, up to ~3e-4 on the
        # scalar gates, whose gradient is a sum of many cancelling terms. A lost hook would be O(1).
        err = (compiled[n] - eager[n]).norm() / eager[n].norm().clamp(min=1e-12)
        assert err <= 2e-3, (n, float(err))

    # New caption lengths and object counts compile nothing new: real captions vary every batch, and a
    # graph per length made the first steps of a Kolors run take 8-98 s each (benchmarks/scaling.md).
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter this test reads is alive

    def longest(captions):  # what sets ChatGLM's sequence length in captioning and retrieval
        return max(len(model.tokenizer.encode(c, add_special_tokens=False)) for c in captions)

    ds = SyntheticLayoutDataset(40, resolution=64, seed=17, min_objects=2, max_objects=3)
    seen = {longest(batch["captions"])}
    # The last batch repeats one sample: captions of equal length, so no row is padded (ChatGLM then
    # takes its unmasked path unless the mask is passed explicitly).
    for items in [[ds[start + i] for i in range(4)] for start in range(0, 40, 4)] + [[ds[0]] * 4]:
        other = collate_layout(items)
        for mode in EXPECTED:
            model(other, mode)["loss"].backward()
        seen.add(longest(other["captions"]))
    assert len(seen) >= 3, seen  # the batches really had other sequence lengths
    assert counters["stats"]["unique_graphs"] == graphs


def test_gradient_checkpointing_gives_the_same_gradients(tiny_stack_dir, batch):
    grads = {}
    for on in (False, True):
        model = make_model(tiny_stack_dir, **{"gradient_checkpointing.unet": on,
                                              "gradient_checkpointing.text_encoder": on})
        assert model.unet.is_gradient_checkpointing == on and model.text_encoder.is_gradient_checkpointing == on
        grads[on] = mode_gradients(model, batch)
    assert grads[True].keys() == grads[False].keys()
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)
