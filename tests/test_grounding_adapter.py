"""The spatial adapter's GLIGEN structure and its box mask on non-square token grids.

* ``injection=self`` in its full-width form *is* diffusers' ``GatedSelfAttentionDense`` (GLIGEN's fuser):
  the same weights give the same output, with both tanh gates open.
* The box mask of each UNet block is built on that block's real ``(h, w)`` token grid, so generation
  works at non-square sizes whose latent sides are not multiples of 4 (a square-root guess of the grid
  from the token count fails there), with both injections.
"""
import pytest
import torch
from omegaconf import OmegaConf

from gill.models.spatial_adapter import GatedSelfAttention


def _diffusers_fuser(dim, context_dim, heads, d_head):
    from diffusers.models.attention import GatedSelfAttentionDense

    torch.manual_seed(0)
    ref = GatedSelfAttentionDense(dim, context_dim, heads, d_head).eval()
    with torch.no_grad():
        for p in ref.parameters():  # random everything, LayerNorms and biases included
            p.copy_(torch.randn_like(p) * 0.2)
        ref.alpha_attn.fill_(0.7)
        ref.alpha_dense.fill_(-0.4)
    return ref


def _load_from_diffusers(ours: GatedSelfAttention, ref) -> None:
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("alpha_")}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert missing == ["gate"] and unexpected == [], (missing, unexpected)
    with torch.no_grad():
        ours.gate.copy_(torch.stack((ref.alpha_attn, ref.alpha_dense)))


def test_full_width_self_injection_is_diffusers_gated_self_attention_dense():
    dim, context_dim, heads, d_head = 64, 24, 4, 16
    ref = _diffusers_fuser(dim, context_dim, heads, d_head)
    ours = GatedSelfAttention(dim, context_dim, inner_dim=None, head_dim=d_head).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    _load_from_diffusers(ours, ref)
    g = torch.Generator().manual_seed(1)
    x, objs = torch.randn(2, 35, dim, generator=g), torch.randn(2, 5, context_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, objs)
        got = x + ours(x, objs)  # ours returns the residual delta
    assert not torch.allclose(expected, x, atol=1e-2), "the gates must be open for the comparison to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Each gate does its own branch: closing the dense gate alone leaves diffusers' attention-only update.
    with torch.no_grad():
        ref.alpha_dense.zero_()
        ours.gate[1] = 0.0
        torch.testing.assert_close(x + ours(x, objs), ref(x, objs), rtol=1e-5, atol=1e-5)


def test_bottleneck_self_injection_keeps_two_gated_branches():
    """With ``inner_dim`` the branches run in a bottleneck; still two gates, each zero at init, and the
    dense branch reads the stream the attention branch updated."""
    layer = GatedSelfAttention(96, 16, inner_dim=32, head_dim=16)
    assert layer.gate.shape == (2,) and torch.equal(layer.gate, torch.zeros(2))
    x, objs = torch.randn(1, 12, 96), torch.randn(1, 3, 16)
    assert torch.equal(layer(x, objs), torch.zeros_like(x))
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, 0.5]))
        both = layer(x, objs)
        # the dense branch on its own input: the attention branch's update changes it
        layer.gate[0] = 0.0
        dense_alone = layer(x, objs)
        layer.gate.copy_(torch.tensor([0.5, 0.0]))
        attn_alone = layer(x, objs)
        dense_after_attn = both - attn_alone
    assert not torch.allclose(dense_after_attn, dense_alone, atol=1e-6), "dense must read the updated stream"


# ---- non-square sizes ------------------------------------------------------------------------------
def _model(tiny_stack_dir, injection):
    from gill.models.model import GillModel
    from gill.models.stack import load_stack

    cfg = OmegaConf.load("conf/model/tiny.yaml")
    cfg.pretrained_path = tiny_stack_dir
    cfg.adapter.spatial.injection = injection
    model = GillModel(load_stack(cfg, device="cpu", dtype=torch.float32), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter.spatial.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in model.adapter.spatial.layers:
            layer.gates().fill_(0.5)
    return model


@pytest.mark.parametrize("injection", ["self", "cross"])
def test_generates_at_non_square_sizes(tiny_stack_dir, injection):
    """40x96 px on the tiny stack (latent 10x24, token grids 5x12 and 3x6): a grid guessed from
    the token count is wrong there. Also 72x40 and 56x104 (the tiny UNet attends from the second level on)."""
    from gill.inference import generate_layout

    model = _model(tiny_stack_dir, injection)
    objects = [("红色圆形", (0.05, 0.1, 0.45, 0.9)), ("蓝色正方形", (0.55, 0.2, 0.95, 0.7))]
    for h, w in ((40, 96), (72, 40), (56, 104)):
        on = generate_layout(model, "白色背景", objects, steps=2, guidance_scale=2.0, beta=1.0, seed=3, height=h,
                             width=w)[0]
        off = generate_layout(model, "白色背景", objects, steps=2, guidance_scale=2.0, beta=0.0, seed=3, height=h,
                              width=w)[0]
        assert on.size == (w, h)
        assert on.tobytes() != off.tobytes(), "the layout must act at this size"
    if injection == "cross":
        sa = model.adapter.spatial
        grids = set(sa._grids.values())
        assert grids == {(7, 13), (4, 7)}, grids  # the last call: 56x104 px, latent 14x26 (no attention at full res)


def test_box_mask_follows_the_recorded_grid(tiny_stack_dir):
    """The mask of a (3, 6) grid: the box's left half covers columns 0..2 of every row (a square guess
    of 18 tokens would be a 4x4 grid and not even have 18 cells)."""
    model = _model(tiny_stack_dir, "cross")
    sa = model.adapter.spatial
    sa.set_layout(torch.zeros(1, 1, model.llm_dim), torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]),
                  torch.tensor([[True]]))
    m = sa._box_mask((3, 6))
    assert m.shape == (1, 18, 2)
    grid = m[0, :, 0].view(3, 6)
    assert grid[:, :3].all() and not grid[:, 3:].any()


def test_kolors_unet_at_520x704_uses_real_grids():
    """Kolors scale, on the meta device (shapes only, nothing allocated): 520x704 px is a 65x88 latent,
    attended at 33x44 and 17x22; guessing the grid from the token count turns 17x22 (374 tokens) into 17x23."""
    from diffusers import UNet2DConditionModel

    from gill.models.spatial_adapter import SpatialAdapter
    from gill.models.stack import KOLORS_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET_CONFIG)
        sa = SpatialAdapter(unet, phrase_dim=4096, injection="cross", inner_dim=128)
        sa.attach(unet)
        boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.5, 0.2, 0.9, 0.9]]])
        sa.set_layout(torch.zeros(1, 2, 4096), boxes, torch.ones(1, 2, dtype=torch.bool))
        out = unet(torch.randn(1, 4, 65, 88), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 256, 4096),
                   added_cond_kwargs={"text_embeds": torch.randn(1, 4096), "time_ids": torch.randn(1, 6)}).sample
    assert out.shape == (1, 4, 65, 88)
    assert set(sa._grids.values()) == {(33, 44), (17, 22)}


def test_self_injection_fits_the_budget_at_kolors_scale():
    """GLIGEN's form on all 70 Kolors blocks in a 112-wide bottleneck: <= 60M spatial parameters
    (128 wide would be 68.5M; full width, diffusers' fuser, 1.81B)."""
    from diffusers import UNet2DConditionModel

    from gill.models.spatial_adapter import SpatialAdapter
    from gill.models.stack import KOLORS_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET_CONFIG)
        sa = SpatialAdapter(unet, phrase_dim=4096, injection="self", inner_dim=112)
    assert len(sa.layers) == 70
    n = sum(p.numel() for p in sa.parameters())
    assert 50e6 < n <= 60e6, n
