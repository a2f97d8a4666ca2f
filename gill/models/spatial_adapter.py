"""The spatial adapter: layout control for the frozen Kolors UNet (GLIGEN family, DESIGN §4).

Two parts:

* :class:`GroundingTokenizer` turns ``(phrase embedding, box)`` pairs into grounding tokens:
  Fourier features of the normalized box + ChatGLM's pooled phrase vector, through an MLP, with
  learned null embeddings in empty slots (padding, or the whole layout when it is dropped).
* :class:`SpatialAdapter` owns one zero-gated injection per chosen UNet transformer block and
  attaches to the UNet with forward hooks, so the UNet's own modules and state dict stay untouched
  and the stack is *exactly* Kolors while the gates are zero.

Injection points (``injection``):

* ``"self"`` — GLIGEN's gated self-attention (diffusers' ``GatedSelfAttentionDense``) on the
  residual stream between ``attn1`` and ``attn2``: two zero-initialised tanh gates, an attention
  branch over ``LN([x; objs])`` kept at the visual positions, then a GEGLU feed-forward branch on
  the *updated* stream. No box mask: as in GLIGEN, the boxes enter only through the tokens.
* ``"cross"`` — a decoupled gated cross-attention from visual tokens to grounding tokens, added
  to ``attn2``'s output; optionally masked so a pixel only attends to the boxes containing it.
  What a pixel inside no box attends to (``outside``): only a learned null token (``"null"``), or
  the null token and every object (``"all"``). With ``"null"`` the adapter adds one constant vector
  to every such pixel; with ``"all"`` the attention weights depend on the pixel, so the adapter can
  act on what the frozen UNet draws outside the boxes (e.g. a caption's object drawn elsewhere). On
  the grounding benchmark ``"all"`` scored lower (docs/grounding_benchmark.md).
  The box mask of a block is built on the ``(h, w)`` token grid that block runs on, recorded by a
  pre-hook on its ``Transformer2DModel``, so non-square sizes work.

Both run in a bottleneck of width ``inner_dim`` to keep the adapter near the ~50M budget at
Kolors scale (diffusers' full-width fuser on all 70 blocks is 1.81B parameters);
``inner_dim=None`` is the full-width form (for ``"self"``: exactly GLIGEN's fuser).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FOURIER_FREQS = 8
FOURIER_TEMPERATURE = 100.0
BOX_FEATURE_DIM = 4 * 2 * FOURIER_FREQS  # sin + cos of x1, y1, x2, y2 -> 64
_LAYER_ATTR = "_gill_grounding"  # on a hooked attn2: its block's cross injection (SpatialAdapter.attach)


def fourier_box_features(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` normalized boxes -> ``[..., 64]`` (GLIGEN's Fourier embedding)."""
    freqs = FOURIER_TEMPERATURE ** (
        torch.arange(FOURIER_FREQS, device=boxes.device, dtype=torch.float32) / FOURIER_FREQS
    )
    x = boxes.float()[..., None] * freqs  # [..., 4, F]
    feats = torch.stack((x.sin(), x.cos()), dim=-1)  # [..., 4, F, 2]
    return feats.permute(*range(feats.dim() - 3), -1, -3, -2).flatten(-3)  # [..., 2*4*F]


class GroundingTokenizer(nn.Module):
    """Phrase embeddings + boxes -> grounding tokens ``[B, N, token_dim]``."""

    def __init__(self, phrase_dim: int, token_dim: int, hidden_dim: int = 512):
        super().__init__()
        self.null_phrase = nn.Parameter(torch.zeros(phrase_dim))
        self.null_box = nn.Parameter(torch.zeros(BOX_FEATURE_DIM))
        self.mlp = nn.Sequential(
            nn.Linear(phrase_dim + BOX_FEATURE_DIM, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, token_dim),
        )

    def forward(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = self.null_phrase.dtype
        m = mask[..., None].to(dtype)
        phrase = phrase_embeds.to(dtype) * m + (1 - m) * self.null_phrase
        box = fourier_box_features(boxes).to(dtype) * m + (1 - m) * self.null_box
        return self.mlp(torch.cat((phrase, box), dim=-1))


def _attention(q, k, v, heads: int, mask=None):
    b, n, d = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, d)


class GEGLUFeedForward(nn.Module):
    """diffusers' ``FeedForward(dim, activation_fn="geglu")``: ``Linear(dim, 2*4*dim)`` -> value * GELU(gate)
    -> ``Linear(4*dim, dim)``. Same parameter names (``net.0.proj``, ``net.2``), so its weights load as is."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = mult * dim
        geglu = nn.Module()
        geglu.proj = nn.Linear(dim, 2 * inner)
        self.net = nn.ModuleList([geglu, nn.Identity(), nn.Linear(inner, dim)])  # [1]: diffusers' dropout slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


class SelfAttention(nn.Module):
    """Multi-head self-attention with diffusers ``Attention``'s parameter names (``to_q``, ``to_k``,
    ``to_v`` without bias, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


def _maybe_linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class GatedSelfAttention(nn.Module):
    """GLIGEN's gated self-attention (``GatedSelfAttentionDense``), returning the residual delta.

    With ``x`` the visual stream and ``objs = linear(tokens)``::

        x = x + tanh(gate[0]) * up_a(Attn(LN1([down_a(x); objs])))[:, :n]
        x = x + tanh(gate[1]) * up_d(FF(LN2(down_d(x))))     # reads the *updated* x

    ``inner_dim=None`` is GLIGEN's full-width form (the down/up projections are identities and the
    weights load from diffusers' ``GatedSelfAttentionDense``); an int runs each branch in a
    bottleneck of that width, for the parameter budget. ``gate`` holds GLIGEN's two zero-initialised
    scalars ``[alpha_attn, alpha_dense]`` in one 1-d tensor (DeepSpeed cannot broadcast 0-d ones).
    The delta, not the updated stream, is returned: ``output + delta`` leaves the frozen UNet bit
    for bit unchanged at zero gates, where ``updated - x`` would round.
    """

    def __init__(self, channels: int, token_dim: int, inner_dim: int | None = None, head_dim: int = 64):
        super().__init__()
        width = channels if inner_dim is None else int(inner_dim)
        self.linear = nn.Linear(token_dim, width)  # GLIGEN projects the grounding tokens to the visual width
        self.down_attn, self.up_attn = _maybe_linear(channels, width), _maybe_linear(width, channels)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, max(1, width // head_dim))
        self.down_dense, self.up_dense = _maybe_linear(channels, width), _maybe_linear(width, channels)
        self.norm2 = nn.LayerNorm(width)
        self.ff = GEGLUFeedForward(width)
        self.gate = nn.Parameter(torch.zeros(2))

    def gates(self) -> torch.Tensor:
        return self.gate

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, box_mask=None) -> torch.Tensor:
        n = x.shape[1]
        alpha_attn, alpha_dense = torch.tanh(self.gate).to(x.dtype).unbind()
        objs = self.linear(tokens.to(x.dtype))
        attn = self.attn(self.norm1(torch.cat((self.down_attn(x), objs), dim=1)))[:, :n]
        delta_attn = alpha_attn * self.up_attn(attn)
        dense = self.ff(self.norm2(self.down_dense(x + delta_attn)))
        return delta_attn + alpha_dense * self.up_dense(dense)


class GatedCrossAttention(nn.Module):
    """Decoupled gated cross-attention from visual tokens to grounding tokens, in a bottleneck:
    visual ``C -> inner``, grounding ``token_dim -> inner``, back to ``C`` (returns the delta)."""

    def __init__(self, channels: int, token_dim: int, inner_dim: int | None = None, head_dim: int = 64):
        super().__init__()
        inner_dim = channels if inner_dim is None else int(inner_dim)
        self.heads = max(1, inner_dim // head_dim)
        self.proj_in = nn.Linear(channels, inner_dim)
        self.proj_tokens = nn.Linear(token_dim, inner_dim)
        self.proj_out = nn.Linear(inner_dim, channels)
        # tanh(0) = 0: the frozen UNet's output is reproduced bit for bit at initialisation.
        self.gate = nn.Parameter(torch.zeros(1))
        self.to_kv = nn.Linear(inner_dim, 2 * inner_dim, bias=False)

    def gates(self) -> torch.Tensor:
        return self.gate

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, box_mask=None) -> torch.Tensor:
        q = self.proj_in(hidden)
        k, v = self.to_kv(self.proj_tokens(tokens.to(hidden.dtype))).chunk(2, dim=-1)
        mask = None if box_mask is None else box_mask[:, None]  # [B, 1, n, N+1]
        return torch.tanh(self.gate).to(hidden.dtype) * self.proj_out(_attention(q, k, v, self.heads, mask))


def _grid_owner(block_name: str) -> str:
    """The module that flattens a block's feature map: ``...attentions.0.transformer_blocks.3`` ->
    ``...attentions.0`` (diffusers' ``Transformer2DModel``)."""
    return block_name.rsplit(".transformer_blocks.", 1)[0]


def transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's BasicTransformerBlocks in module order (70 in Kolors)."""
    return [(name, m) for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


def select_blocks(names: list[str], blocks: str | Iterable[str]) -> list[str]:
    """``"all"``, ``"mid_up"``, ``"up"``, ``"mid"``, ``"down"``, or explicit name prefixes."""
    groups = {
        "all": ("",),
        "down": ("down_blocks",),
        "mid": ("mid_block",),
        "up": ("up_blocks",),
        "mid_up": ("mid_block", "up_blocks"),
    }
    prefixes = groups[blocks] if isinstance(blocks, str) else tuple(blocks)
    chosen = [n for n in names if n.startswith(prefixes)]
    if not chosen:
        raise ValueError(f"spatial adapter block selection {blocks!r} matches no transformer block")
    return chosen


class SpatialAdapter(nn.Module):
    """Grounding tokenizer + one gated injection per chosen UNet transformer block."""

    def __init__(
        self,
        unet: nn.Module,
        phrase_dim: int,
        injection: str = "self",
        blocks: str | list[str] = "all",
        inner_dim: int | None = 128,
        token_dim: int = 512,
        tokenizer_hidden: int = 512,
        head_dim: int = 64,
        max_objects: int = 30,
        box_mask: bool = True,
        outside: str = "null",
    ):
        super().__init__()
        if injection not in ("self", "cross"):
            raise ValueError(f"spatial adapter injection must be 'self' or 'cross', got {injection!r}")
        if outside not in ("null", "all"):
            raise ValueError(f"spatial adapter outside must be 'null' or 'all', got {outside!r}")
        self.injection = injection
        self.max_objects = max_objects
        self.use_box_mask = box_mask and injection == "cross"
        self.outside = outside
        self.tokenizer = GroundingTokenizer(phrase_dim, token_dim, tokenizer_hidden)
        # Always-visible null key: a pixel inside no box still has something to attend to.
        self.null_token = nn.Parameter(torch.zeros(1, 1, token_dim)) if injection == "cross" else None
        all_blocks = dict(transformer_blocks(unet))
        self.block_names = select_blocks(list(all_blocks), blocks)
        cls = GatedSelfAttention if injection == "self" else GatedCrossAttention
        self.layers = nn.ModuleList(
            cls(all_blocks[n].norm1.normalized_shape[0], token_dim, inner_dim, head_dim) for n in self.block_names
        )
        self._handles: list = []
        self._hooked: list = []  # the attn2 modules holding a back-reference to their injection
        self._state: dict = {}
        self._block_inputs: dict = {}
        # (h, w) of the token grid each transformer model last ran on, recorded by a pre-hook:
        # the box mask's grid, never guessed from a token count (latent sides that are not
        # multiples of 4 give grids a square-root guess gets wrong: 40x96 px on the tiny stack).
        self._grids: dict[str, tuple[int, int]] = {}

    @property
    def block_traceable(self) -> bool:
        """Whether a UNet transformer block compiled whole can trace this adapter's hooks with one graph for all
        blocks (model.compile_blocks): the cross hook is one object for every block; the self injection's hooks
        close over their block's name, so each block would get a graph of its own."""
        return self.injection == "cross"

    # ---- per-call state -------------------------------------------------------------------
    def set_layout(self, phrase_embeds, boxes, mask, latent_hw: tuple[int, int] | None = None):
        """Set the layout for the next UNet call(s). ``latent_hw`` is informational only: each
        block's box mask uses the token grid that block really runs on (see :meth:`attach`).

        The state stays set (it is not a context manager) on purpose: with gradient
        checkpointing the UNet blocks are re-run during backward, and the hooks must see the
        same grounding tokens then.
        """
        boxes, mask, phrase_embeds = self._cap_objects(boxes, mask, phrase_embeds)
        tokens = self.tokenizer(phrase_embeds, boxes, mask)
        if self.null_token is not None:
            tokens = torch.cat((tokens, self.null_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)), dim=1)
        # The object count changes with nearly every batch: compiled injections (model.compile_adapter) take it
        # as a symbolic size from the first call instead of compiling a graph per count (gill/training/compile.py).
        torch._dynamo.maybe_mark_dynamic(tokens, 1)
        self._state = {"tokens": tokens, "boxes": boxes, "mask": mask}

    def clear_layout(self):
        self._state = {}

    def _cap_objects(self, boxes, mask, phrase_embeds):
        """Keep at most ``max_objects`` per image, the largest first (stable for equal areas)."""
        if boxes.shape[1] <= self.max_objects:
            return boxes, mask, phrase_embeds
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).masked_fill(~mask, -1)
        order = area.argsort(dim=1, descending=True, stable=True)[:, : self.max_objects]
        take = lambda t: t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))  # noqa: E731
        return take(boxes), take(mask), take(phrase_embeds)

    def _box_mask(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``[B, gh*gw, N+1]`` bool over a ``(gh, gw)`` token grid (row-major, as diffusers'
        ``Transformer2DModel`` flattens it): token i may attend to object j iff its centre lies in
        box j (or, with ``outside="all"``, iff it lies in no box); the null token (last) is always
        visible."""
        gh, gw = grid_hw
        boxes, mask = self._state["boxes"], self._state["mask"]
        ys = (torch.arange(gh, device=boxes.device, dtype=torch.float32) + 0.5) / gh
        xs = (torch.arange(gw, device=boxes.device, dtype=torch.float32) + 0.5) / gw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(1, -1, 1), cy.reshape(1, -1, 1)
        b = boxes.float()[:, None]  # [B, 1, N, 4]
        inside = (cx >= b[..., 0]) & (cx <= b[..., 2]) & (cy >= b[..., 1]) & (cy <= b[..., 3]) & mask[:, None]
        if self.outside == "all":
            inside = inside | (~inside.any(-1, keepdim=True) & mask[:, None])
        null = torch.ones(*inside.shape[:2], 1, dtype=torch.bool, device=inside.device)
        return torch.cat((inside, null), dim=-1)

    # ---- hooks ----------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        """Register the hooks on ``unet`` (idempotent)."""
        self.detach()
        blocks = dict(transformer_blocks(unet))
        for parent in dict.fromkeys(map(_grid_owner, self.block_names)):
            module = unet.get_submodule(parent)
            self._handles.append(module.register_forward_pre_hook(self._record_grid(parent), with_kwargs=True))
        for name, layer in zip(self.block_names, self.layers):
            block = blocks[name]
            if self.injection == "self":
                self._handles.append(block.register_forward_pre_hook(self._save_block_input(name), with_kwargs=True))
                self._handles.append(block.attn1.register_forward_hook(self._self_hook(name, layer)))
            else:
                # One hook object for every block, which finds its layer on the module: a transformer block
                # compiled whole (model.compile_blocks) traces the hook, and a hook closing over its block
                # would make a graph per block. In the instance __dict__, not a child module: the UNet's
                # modules and state dict stay untouched.
                block.attn2.__dict__[_LAYER_ATTR] = layer
                self._hooked.append(block.attn2)
                self._handles.append(block.attn2.register_forward_hook(self._cross_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn in self._hooked:
            attn.__dict__.pop(_LAYER_ATTR, None)
        self._hooked = []

    def _record_grid(self, parent):
        # The transformer model receives the [B, C, h, w] feature map and flattens it for its blocks.
        # Kept after the call: checkpointed blocks re-run in backward and read it again. The box mask of
        # that grid is built here, once per grid and layout, outside any compiled block, and shared by the
        # blocks on the grid (Kolors: 70 blocks on 2 grids) and by their checkpointed re-runs.
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.dim() == 4:
                grid = (int(hidden.shape[-2]), int(hidden.shape[-1]))
                self._grids[parent] = grid
                if self._state and self.use_box_mask:
                    masks = self._state.setdefault("masks", {})
                    if grid[0] * grid[1] not in masks:
                        masks[grid[0] * grid[1]] = mask = self._box_mask(grid)
                        torch._dynamo.maybe_mark_dynamic(mask, 2)  # its object axis, like the tokens'

        return hook

    def _save_block_input(self, name):
        def hook(module, args, kwargs):
            if self._state:
                self._block_inputs[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _self_hook(self, name, layer):
        def hook(module, args, output):
            if not self._state:
                return None
            # The block adds attn1's output to its input; GLIGEN's fuser acts on that sum.
            residual = output + self._block_inputs.pop(name)
            return output + layer(residual, self._state["tokens"])

        return hook

    def _cross_hook(self, module, args, kwargs, output):
        if not self._state:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = None
        if self.use_box_mask:
            # Keyed by token count: the grids of one UNet call differ in it (each level halves both sides).
            mask = self._state.get("masks", {}).get(hidden.shape[1])
            if mask is None:
                raise RuntimeError(f"spatial adapter: no token grid recorded with {hidden.shape[1]} tokens "
                                   f"(recorded: {sorted(self._grids.values())})")
        return output + module.__dict__[_LAYER_ATTR](hidden, self._state["tokens"], mask)

