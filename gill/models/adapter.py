"""The adapter: every module that trains, in one ``nn.Module`` (DESIGN §4).

* ``visual_prefix`` — vision features -> ``k`` ChatGLM input embeddings (captioning);
* ``img_tokens`` / ``img_output`` — ``r`` learned ``[IMG]`` input embeddings and ``r`` output rows in
  their own tables (the 65k-row vocabulary matrix and LM head are never resized or trained): the
  LM's next-token logits become ``frozen head(h) ‖ h·img_outputᵀ``, so it can *emit* ``[IMG0]``;
* ``text_proj`` / ``image_proj`` / ``logit_scale`` — retrieval;
* ``mapper`` — ``[IMG]`` hidden states -> Kolors conditioning (generation);
* ``spatial`` — the layout adapter hooked into the UNet (generation).

Exporting ``adapter.state_dict()`` gives exactly the artifact inference loads. For training,
:meth:`GillAdapter.flatten` stores the trainables in one tensor (:mod:`gill.training.flat_params`); names and
the state dict stay the same.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gill.training.flat_params import FlatParameters
from gill.models.mapper import GillMapper
from gill.models.spatial_adapter import SpatialAdapter

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


# The choices GILL made and their alternatives (model.adapter.*); GILL's come first.
CHOICES = {
    # text side of retrieval: the first [IMG] position's projection (GILL) or the mean over all r
    "retrieval_embedding": ("first", "mean"),
    # mapper input: [IMG] hidden states + [IMG] input embeddings (GILL's TextFcLayer) or hidden only
    "mapper_input": ("hidden_plus_embed", "hidden"),
    # [IMG] input rows: rescaled to the frozen vocabulary's mean row norm (GILL) or used as trained
    "img_norm": ("vocab_mean", "none"),
}


def choice(cfg, key: str) -> str:
    """``cfg[key]`` checked against :data:`CHOICES`; GILL's option when the key is absent."""
    value = cfg.get(key, CHOICES[key][0])
    if value not in CHOICES[key]:
        raise ValueError(f"adapter.{key} must be one of {CHOICES[key]}, got {value!r}")
    return value


class GillAdapter(nn.Module):
    flat_params: FlatParameters | None = None

    def __init__(
        self, cfg, *, llm_dim: int, vision_dim: int, prompt_len: int, unet: nn.Module, vocab_norm: float | None = None
    ):
        """``vocab_norm``: the frozen vocabulary's mean input-row norm (``img_norm: vocab_mean`` needs it)."""
        super().__init__()
        self.num_prefix = cfg.prefix_tokens
        self.num_img = cfg.img_tokens
        self.retrieval_embedding = choice(cfg, "retrieval_embedding")
        self.mapper_input = choice(cfg, "mapper_input")
        self.img_norm = choice(cfg, "img_norm")
        # Not persistent: a fact of the frozen stack, recomputed whenever GillModel builds the adapter.
        # NaN when not given (parameter counting, planning): a forward would then fail loudly.
        nan = float("nan")
        self.register_buffer("vocab_norm", torch.tensor(nan if vocab_norm is None else float(vocab_norm)), persistent=False)
        self.visual_prefix = nn.Linear(vision_dim, cfg.prefix_tokens * llm_dim)
        self.img_tokens = nn.Parameter(torch.randn(cfg.img_tokens, llm_dim) * 0.02)
        # Output rows: ChatGLM's head is not tied to its input embeddings (OPT's, in GILL, is), so
        # [IMG] gets its own r output rows. Zero: at init every [IMG] logit is 0, no special pull.
        self.img_output = nn.Parameter(torch.zeros(cfg.img_tokens, llm_dim))
        self.text_proj = nn.Linear(llm_dim, cfg.retrieval_dim)
        self.image_proj = nn.Linear(vision_dim, cfg.retrieval_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))  # 1-d: DeepSpeed cannot broadcast 0-d
        m = cfg.mapper
        self.mapper = GillMapper(
            llm_dim, llm_dim, prompt_len, width=m.width, encoder_layers=m.encoder_layers,
            decoder_layers=m.decoder_layers, heads=m.heads,
        )
        s = cfg.spatial
        # .get: adapters saved before ``outside`` existed keep their behaviour
        self.spatial = SpatialAdapter(
            unet, phrase_dim=llm_dim, injection=s.injection, blocks=s.blocks, inner_dim=s.inner_dim,
            token_dim=s.token_dim, tokenizer_hidden=s.tokenizer_hidden, head_dim=s.head_dim,
            max_objects=s.max_objects, box_mask=s.box_mask, outside=s.get("outside", "null"),
        )

    def prefix_embeds(self, vision_features: torch.Tensor) -> torch.Tensor:
        """``[B, Dv]`` -> ``[B, k, H]``."""
        return self.visual_prefix(vision_features).view(vision_features.shape[0], self.num_prefix, -1)

    def img_embeds(self) -> torch.Tensor:
        """``[r, H]``: the ``[IMG]`` input embeddings as the LM sees them.

        GILL rescales its trained rows to the frozen vocabulary's mean norm after every optimizer
        step. Here the rescaling is part of the forward (a reparametrisation): the LM sees the same
        rows, and nothing has to edit weights after DeepSpeed's step (whose fp32 master copy, on the
        CPU with offload, would overwrite an in-place edit of the model's weights).
        """
        rows = self.img_tokens
        if self.img_norm == "vocab_mean":
            rows = rows * (self.vocab_norm.to(rows.dtype) / rows.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return rows

    def img_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` final-normed hidden states -> ``[..., r]`` logits of ``[IMG0..r-1]``, to be
        concatenated after the frozen head's ``[..., V]``."""
        return hidden @ self.img_output.to(hidden.dtype).T

    def text_embedding(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """``[B, r, H]`` hidden states at ``[IMG]`` -> ``[B, d]`` retrieval embedding (unnormalised)."""
        if self.retrieval_embedding == "first":
            return self.text_proj(img_hidden[:, 0])
        return self.text_proj(img_hidden).mean(dim=1)

    def map_to_conditioning(self, img_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, r, H]`` hidden states at ``[IMG]`` -> Kolors conditioning ``(tokens, pooled)``."""
        x = img_hidden
        if self.mapper_input == "hidden_plus_embed":
            x = x + self.img_embeds().to(x.dtype)  # GILL's TextFcLayer: x = x + input_embs
        return self.mapper(x)

    def scale(self) -> torch.Tensor:
        """The retrieval temperature, clamped so the logits cannot blow up (CLIP's 100)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def flatten(self) -> None:
        """Keep every trainable in one flat parameter (fewer tensors for DeepSpeed's per-parameter work)."""
        self.flat_params = FlatParameters(self)

    def refresh(self) -> None:
        """Fresh views of the flat parameter (a no-op unless flattened); called at each forward."""
        if self.flat_params is not None:
            self.flat_params.refresh()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()  # .to()/.bfloat16() replaced the flat parameter's storage
        return self

    def parameter_groups(self) -> dict[str, int]:
        """Parameter count per part, for the parameter table."""
        parts = {
            "visual_prefix": self.visual_prefix,
            "img_tokens (input + output rows)": [self.img_tokens, self.img_output],
            "retrieval (text/image proj, scale)": [*self.text_proj.parameters(), *self.image_proj.parameters(), self.logit_scale],
            "gill_mapper": self.mapper,
            "spatial: grounding tokenizer": self.spatial.tokenizer,
            "spatial: gated injections": self.spatial.layers,
        }
        out = {}
        for name, part in parts.items():
            params = part.parameters() if isinstance(part, nn.Module) else part
            out[name] = sum(p.numel() for p in params)
        if self.spatial.null_token is not None:
            out["spatial: grounding tokenizer"] += self.spatial.null_token.numel()
        return out
