"""Captioning: image -> visual prefix -> frozen ChatGLM -> text, greedy or beam search.

The sequence is laid out exactly as in training (:func:`gill.models.modes.captioning`):
``[gMASK] sop`` + ``k`` visual-prefix slots + caption tokens, ending at ``eos``. Every sequence in
a batch grows by one token per step from the same starting length, so the batch stays rectangular
and needs no padding; each step simply re-runs the whole (short) sequence. That costs
O(length²) but needs nothing from ChatGLM's cache API, which differs across transformers versions.
"""
from __future__ import annotations

import torch

from gill.models.chatglm import lm_logits, run_chatglm
from gill.models.modes import SLOT, assemble_inputs


def _vision_features(model, images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):  # precomputed CLIP embeddings [B, Dv]
        return images.to(model.device, model.dtype)
    return model.vision_features({"images": [im.convert("RGB") for im in images]})


def allowed_token_mask(text_encoder, tokenizer) -> torch.Tensor:
    """``[V]`` bool: ids a caption may contain.

    Excludes ChatGLM's role/mask specials (``[gMASK]``, ``sop``, ``<|user|>`` ...), bos/unk, and the
    padded vocabulary rows no token maps to; a model this early in training would otherwise emit them.
    """
    vocab = text_encoder.output_layer.out_features
    tok = tokenizer
    sp = getattr(tok, "tokenizer", None)
    n_real = min(vocab, getattr(sp, "n_words", len(tok)))
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[:n_real] = True
    for tid in list(getattr(sp, "special_tokens", {}).values()) + [getattr(sp, "bos_id", None), tok.pad_token_id]:
        if tid is not None and 0 <= tid < vocab and tid != tok.eos_token_id:
            allowed[tid] = False
    return allowed.to(text_encoder.output_layer.weight.device)


def next_token_logprobs(model, prefix: torch.Tensor, tokens: list[list[int]], allowed: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[M, V]`` of the next caption token for ``M`` sequences of equal length."""
    head = model.tokenizer.get_prefix_tokens() + [SLOT] * prefix.shape[1]
    embeds, mask, _ = assemble_inputs(model, [head + t for t in tokens], prefix)
    hidden, _ = run_chatglm(model.text_encoder, embeds, mask)
    logits = lm_logits(model.text_encoder, hidden[:, -1]).float()
    return logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def _decode(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_caption(model, images, *, max_new_tokens: int = 32) -> list[str]:
    """Greedy captions for a list of PIL images (or precomputed vision features ``[B, Dv]``)."""
    prefix = model.adapter.prefix_embeds(_vision_features(model, images))
    eos, allowed = model.tokenizer.eos_token_id, allowed_token_mask(model.text_encoder, model.tokenizer)
    tokens: list[list[int]] = [[] for _ in range(prefix.shape[0])]
    done = [False] * len(tokens)
    for _ in range(max_new_tokens):
        nxt = next_token_logprobs(model, prefix, tokens, allowed).argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                done[i] = t == eos
            # finished rows keep growing (with eos) so every row has the same length
            tokens[i].append(eos if done[i] else t)
        if all(done):
            break
    return [_decode(model, [t for t in row if t != eos]) for row in tokens]


@torch.no_grad()
def beam_caption(model, images, *, num_beams: int = 4, max_new_tokens: int = 32, length_penalty: float = 1.0) -> list[str]:
    """Beam search: keep the ``num_beams`` best partial captions by summed log-probability; a
    finished caption scores ``sum / length**length_penalty`` (HF's convention). Stops when
    ``num_beams`` captions finished or after ``max_new_tokens``."""
    feats = _vision_features(model, images)
    prefix = model.adapter.prefix_embeds(feats)
    eos, allowed = model.tokenizer.eos_token_id, allowed_token_mask(model.text_encoder, model.tokenizer)
    out = []
    for b in range(prefix.shape[0]):  # one image at a time: its beams form the batch
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_new_tokens):
            logp = next_token_logprobs(model, prefix[b : b + 1].expand(len(beams), -1, -1), [t for t, _ in beams], allowed)
            scores = torch.tensor([s for _, s in beams], device=logp.device)[:, None] + logp
            top = scores.flatten().topk(min(2 * num_beams, scores.numel()))
            alive = []
            for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                if score == float("-inf"):
                    break
                beam, tok = divmod(idx, logp.shape[1])
                toks = beams[beam][0]
                if tok == eos:
                    if rank < num_beams:  # an eos below the top num_beams would not have survived
                        finished.append((score / max(len(toks) + 1, 1) ** length_penalty, toks))
                else:
                    alive.append((toks + [tok], score))
                if len(alive) == num_beams:
                    break
            beams = alive
            if len(finished) >= num_beams or not beams:
                break
        finished += [(s / max(len(t), 1) ** length_penalty, t) for t, s in beams]
        out.append(_decode(model, max(finished, key=lambda x: x[0])[1]))
    return out


def caption(model, images, *, max_new_tokens: int = 32, num_beams: int = 1, length_penalty: float = 1.0) -> list[str]:
    """Captions for ``images`` (PIL list or vision features ``[B, Dv]``): greedy when ``num_beams == 1``."""
    if len(images) == 0:
        return []
    if num_beams <= 1:
        return greedy_caption(model, images, max_new_tokens=max_new_tokens)
    return beam_caption(model, images, num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
