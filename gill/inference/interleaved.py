"""The LM decides when to show an image: greedy continuation that may emit ``[IMG0]`` (GILL).

GILL's ``generate_for_images_and_texts``, for text prompts: ChatGLM continues the prompt greedily
with the adapter's LM head (frozen vocabulary ‖ ``[IMG0..r-1]``, :func:`gill.models.modes.full_logits`).
``[IMG1..r-1]`` are never sampled (GILL filters them); when ``[IMG0]`` wins, the text stops, the
``r`` ``[IMG]`` tokens are appended as in training, and their hidden states give

* a retrieval embedding (``adapter.text_embedding``) -> top-``k`` images of a :class:`RetrievalIndex`;
* Kolors conditioning through the GILL mapper -> images (:func:`generate_layout`, ``use_mapper``).

GILL picks between the two with a separately trained decision classifier; here the caller asks for
either or both. Each step re-runs the whole short sequence (no KV cache), as captioning does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gill.models.chatglm import embed_tokens, run_chatglm
from gill.inference.captioning import allowed_token_mask
from gill.models.modes import full_logits, img_token_forward_ids, img_token_id


@dataclass
class Continuation:
    """What the model produced: the new text, and whether it ended by asking for an image."""

    text: str
    ids: list[int]  # prompt + new text tokens (no [gMASK] sop, no [IMG])
    wants_image: bool
    hits: list[tuple[str, float]] = field(default_factory=list)  # retrieved (path, cosine)
    images: list = field(default_factory=list)  # generated PIL images


def next_token_scores(model, ids: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """``[V + r]`` logits of the token after ``[gMASK] sop`` + ``ids``, with disallowed vocabulary
    rows and ``[IMG1..r-1]`` at ``-inf`` (only ``[IMG0]`` may start an image)."""
    seq = torch.tensor([model.tokenizer.get_prefix_tokens() + ids], device=model.device)
    mask = torch.ones_like(seq)
    hidden, _ = run_chatglm(model.text_encoder, embed_tokens(model.text_encoder, seq), mask)
    return full_logits(model, hidden[0, -1]).float().masked_fill(~emittable(model, allowed), float("-inf"))


def emittable(model, allowed: torch.Tensor) -> torch.Tensor:
    """``[V + r]`` bool: the vocabulary ids a text may contain (``allowed``) and ``[IMG0]``."""
    keep = torch.cat((allowed, torch.zeros(model.adapter.num_img, dtype=torch.bool, device=allowed.device)))
    keep[img_token_id(model, 0)] = True
    return keep


@torch.no_grad()
def continue_prompt(model, prompt: str, *, max_new_tokens: int = 32, min_word_tokens: int = 0) -> Continuation:
    """Greedy continuation of ``prompt`` until ``eos``, ``[IMG0]`` or ``max_new_tokens``.
    ``min_word_tokens``: no ``[IMG0]`` before this many new tokens (GILL's option of that name)."""
    allowed = allowed_token_mask(model.text_encoder, model.tokenizer)
    eos, img0 = model.tokenizer.eos_token_id, img_token_id(model, 0)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    start = len(ids)
    wants_image = False
    for step in range(max_new_tokens):
        scores = next_token_scores(model, ids, allowed)
        if step < min_word_tokens:
            scores[img0] = float("-inf")
        nxt = int(scores.argmax())
        if nxt == img0:
            wants_image = True
            break
        if nxt == eos:
            break
        ids.append(nxt)
    text = model.tokenizer.decode(ids[start:], skip_special_tokens=True)
    return Continuation(text=text, ids=ids, wants_image=wants_image)


@torch.no_grad()
def generate_for_text(
    model,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    min_word_tokens: int = 0,
    index=None,
    k: int = 1,
    generate: bool = False,
    **generate_kwargs,
) -> Continuation:
    """Continue ``prompt``; if the model emits ``[IMG0]``, retrieve from ``index`` (top-``k``) and/or
    ``generate`` images (keyword arguments go to :func:`generate_layout`, e.g. ``steps``, ``seed``).
    Nothing image-related runs when the model does not ask for an image."""
    out = continue_prompt(model, prompt, max_new_tokens=max_new_tokens, min_word_tokens=min_word_tokens)
    if not out.wants_image:
        return out
    # The [IMG] hidden states after exactly the tokens the model saw, laid out as in training.
    img_hidden, _ = img_token_forward_ids(model, [out.ids])
    if index is not None:
        q = F.normalize(model.adapter.text_embedding(img_hidden).float(), dim=-1)
        out.hits = index.query_embeddings(q, k)[0]
    if generate:
        from gill.inference.layout_pipeline import generate_layout

        # The mapper reads the [IMG] hidden states after the text (prompt + continuation); the
        # pipeline recomputes them from that text.
        context = model.tokenizer.decode(out.ids, skip_special_tokens=True)
        out.images = generate_layout(model, context, use_mapper=True, **generate_kwargs)
    return out


@torch.no_grad()
def img_emission(model, captions: list[str]) -> dict[str, float]:
    """How often ``[IMG0]`` is the greedy next token (with :func:`next_token_scores`' masking) after
    each caption (``end``) and after each proper prefix of it of at least one token (``inside``).

    One causal forward per batch gives every position. Returns the two rates and their counts.
    """
    from gill.models.modes import _caption_ids, _prefix, assemble_inputs

    ids = [_caption_ids(model, c) for c in captions]
    seqs = [_prefix(model) + t for t in ids]
    no_slots = model.adapter.img_tokens.new_zeros(len(seqs), 0, model.llm_dim)
    embeds, mask, _ = assemble_inputs(model, seqs, no_slots)
    hidden, _ = run_chatglm(model.text_encoder, embeds, mask)
    width = hidden.shape[1]
    # hidden at the position of caption token j-1 predicts what follows the first j tokens
    rows, cols, is_end = [], [], []
    for i, t in enumerate(ids):
        for j in range(1, len(t) + 1):
            rows.append(i)
            cols.append(width - len(t) + j - 1)
            is_end.append(j == len(t))
    logits = full_logits(model, hidden[rows, cols]).float()
    keep = emittable(model, allowed_token_mask(model.text_encoder, model.tokenizer))
    emits = logits.masked_fill(~keep, float("-inf")).argmax(-1).cpu() == img_token_id(model, 0)
    is_end = torch.tensor(is_end)
    return {
        "end": emits[is_end].float().mean().item(),
        "inside": emits[~is_end].float().mean().item() if (~is_end).any() else 0.0,
        "n_end": int(is_end.sum()),
        "n_inside": int((~is_end).sum()),
    }
