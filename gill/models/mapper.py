"""The GILL mapper: ``[IMG]`` hidden states -> Kolors conditioning (DESIGN §4).

A small encoder-decoder Transformer with learned queries turns the LLM's hidden states at the
``r`` ``[IMG]`` positions into ``L`` token embeddings in ChatGLM's ``hidden_states[-2]`` space plus a
pooled vector, so the frozen UNet can be driven by the LLM instead of by a caption encoding.
"""
from __future__ import annotations

import torch
from torch import nn


class GillMapper(nn.Module):
    def __init__(
        self,
        llm_dim: int,
        out_dim: int,
        num_queries: int,
        width: int = 512,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        heads: int = 8,
    ):
        super().__init__()
        self.proj_in = nn.Linear(llm_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.transformer = nn.Transformer(
            d_model=width,
            nhead=heads,
            num_encoder_layers=encoder_layers,
            num_decoder_layers=decoder_layers,
            dim_feedforward=4 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.proj_tokens = nn.Linear(width, out_dim)
        self.proj_pooled = nn.Linear(width, out_dim)

    def forward(self, img_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``img_hidden [B, r, llm_dim]`` -> ``(tokens [B, L, out_dim], pooled [B, out_dim])``."""
        src = self.proj_in(img_hidden)
        tgt = self.queries.to(src.dtype).expand(src.shape[0], -1, -1)
        out = self.transformer(src, tgt)
        return self.proj_tokens(out), self.proj_pooled(out.mean(dim=1))
