"""The adapter: every module that trains, in one ``nn.Module`` (DESIGN §4).

* ``visual_prefix`` — vision features -> ``k`` ChatGLM input embeddings (captioning);
* ``img_tokens`` — ``r`` learned ``[IMG]`` input embeddings in their own table (the 65k-row
  vocabulary matrix is never resized or trained);
* ``text_proj`` / ``image_proj`` / ``logit_scale`` — retrieval;
* ``mapper`` — ``[IMG]`` hidden states -> Kolors conditioning (generation);
* ``spatial`` — the layout adapter hooked into the UNet (generation).

Exporting ``adapter.state_dict()`` gives exactly the artifact inference loads. For training,
:meth:`GillAdapter.flatten` stores the trainables in one tensor (:mod:`gill.flat_params`); names and
the state dict stay the same.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gill.flat_params import FlatParameters
from gill.mapper import GillMapper
from gill.spatial_adapter import SpatialAdapter

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class GillAdapter(nn.Module):
    flat_params: FlatParameters | None = None

    def __init__(self, cfg, *, llm_dim: int, vision_dim: int, prompt_len: int, unet: nn.Module):
        super().__init__()
        self.num_prefix = cfg.prefix_tokens
        self.num_img = cfg.img_tokens
        self.visual_prefix = nn.Linear(vision_dim, cfg.prefix_tokens * llm_dim)
        self.img_tokens = nn.Parameter(torch.randn(cfg.img_tokens, llm_dim) * 0.02)
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
            "img_tokens": [self.img_tokens],
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
