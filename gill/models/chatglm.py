"""Batch-first helpers around the frozen, sequence-first ChatGLM3 text encoder.

ChatGLM (diffusers' Kolors port) runs ``[seq, batch, hidden]`` inside and reads the sequence shape
from ``input_ids`` even when ``inputs_embeds`` is given. Everything else in the project speaks
``[batch, seq, hidden]``; the conversions live here and nowhere else.
"""
from __future__ import annotations

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded positions as ChatGLMTokenizer makes them: pads at 0, real tokens 0, 1, 2, ..."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Varying sequences are left-padded to a multiple of this. Under `model.compile` ChatGLM's layers have a
# symbolic length, and Inductor guards on its alignment to 8: the first batch of the other kind recompiled
# every layer mid-run (an 18.8 s step at step 31 of a Kolors run, 2026-12-03). Costs <= 7 masked tokens;
# real tokens' outputs do not change (pad positions' do: a pad row attends to every position).
SEQ_MULTIPLE = 8


def run_chatglm(
    text_encoder: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    output_hidden_states: bool = False,
    multiple: int = SEQ_MULTIPLE,
):
    """Run ChatGLM on batch-first embeddings ``[B, S, H]`` with a left-padding mask ``[B, S]``.

    Returns ``(last_hidden [B, S, H] after the final norm, hidden_states tuple or None)``; the
    hidden states stay sequence-first as ChatGLM returns them (Kolors indexes them that way).
    ``multiple``: the length is padded to a multiple of it (1: as given).
    """
    b, s, _ = inputs_embeds.shape
    pad = -s % multiple
    if pad:  # masked on the left, as the tokenizer pads; cut off again below
        inputs_embeds = nn.functional.pad(inputs_embeds, (0, 0, pad, 0))
        attention_mask = nn.functional.pad(attention_mask, (pad, 0))
    # ChatGLM only reads input_ids' shape when inputs_embeds is given (and for the padding mask).
    dummy_ids = torch.zeros(b, s + pad, dtype=torch.long, device=inputs_embeds.device)
    # Always the explicit [B, 1, S, S] mask: ChatGLM passes None to its layers when no row is padded,
    # and under `model.compile` that is a second graph of every layer, compiled mid-run whenever a
    # batch happens to have no padding (a one-label phrase, captions of equal length).
    full_mask = text_encoder.get_masks(dummy_ids, None, padding_mask=attention_mask)
    # Contiguous copies, not transposed views: a linear on a strided [S, B, H] input falls back to a
    # batched matmul over S with B-wide tiles (measured: 63% of a micro-batch-8 step's GPU time).
    out = text_encoder(
        input_ids=dummy_ids,
        inputs_embeds=inputs_embeds.transpose(0, 1).contiguous(),
        attention_mask=attention_mask,
        full_attention_mask=full_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden_states,
        use_cache=False,
        return_dict=True,
    )
    hidden_states = tuple(h[pad:] for h in out.hidden_states) if out.hidden_states is not None else None
    return out.last_hidden_state[pad:].transpose(0, 1).contiguous(), hidden_states


def embed_tokens(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Frozen word embeddings, batch-first ``[B, S, H]``."""
    return text_encoder.embedding.word_embeddings(input_ids)


def lm_logits(text_encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The frozen LM head on final-normed hidden states (any leading shape)."""
    return text_encoder.output_layer(hidden)


def tokenize(tokenizer, texts: list[str], max_length: int, padding: str = "longest", device=None):
    """Tokenize with ChatGLM's ``[gMASK] sop`` prefix, left padding and truncation."""
    enc = tokenizer(
        list(texts), padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, texts: list[str], max_length: int, device=None, padding="max_length"):
    """Kolors' prompt encoding: ``hidden_states[-2]`` as ``[B, L, H]`` and the pooled vector.

    Exactly what KolorsPipeline.encode_prompt does: pad to ``max_length``, take the penultimate
    hidden states, and the last position of the last hidden state *before* the final norm.
    ``padding="longest"`` gives the same pooled vector for less work (left padding keeps the last
    token last and masked pads change nothing), which is how phrases are encoded.
    """
    input_ids, attention_mask = tokenize(tokenizer, texts, max_length, padding=padding, device=device)
    embeds = embed_tokens(text_encoder, input_ids)
    # At max_length the length never varies, and the pad positions are part of Kolors' conditioning:
    # run exactly that length.
    multiple = 1 if padding == "max_length" else SEQ_MULTIPLE
    _, hidden_states = run_chatglm(text_encoder, embeds, attention_mask, output_hidden_states=True, multiple=multiple)
    prompt_embeds = hidden_states[-2].transpose(0, 1).contiguous()
    pooled = hidden_states[-1][-1]
    return prompt_embeds, pooled
