"""Grounding backends: one small interface over the Qwen-VL family (DESIGN §8).

A backend turns a batch of (resized image, caption) into generated text and knows how to read it back::

    backend = make_backend(cfg.backend, prompts=cfg.prompts)   # loads model + tokenizer + image processor
    texts = backend.generate(images, captions, ids)            # batched, left-padded, greedy, bounded
    objs = parse_grounding(text, width=w, height=h, fmt=backend.fmt)

| backend   | model class (transformers)          | output                          | ``fmt``    |
|-----------|-------------------------------------|---------------------------------|------------|
| qwen2vl   | Qwen2VLForConditionalGeneration     | ``<|box_start|>(x,y),(x,y)``, 0–1000 | qwen2vl |
| qwen25vl  | Qwen2_5_VLForConditionalGeneration  | JSON ``bbox_2d``, resized-input pixels | qwen25vl |
| qwen3vl   | Qwen3VLForConditionalGeneration     | JSON ``bbox_2d``, 0–1000         | json1000  |

All load through ``AutoModelForImageTextToText`` / ``AutoTokenizer`` / ``AutoImageProcessor`` from a local
directory (no hub, no ``trust_remote_code``). The inputs are built the way ``Qwen2VLProcessor`` builds them
(chat template, then each ``<|image_pad|>`` expanded to the image's token count): transformers 5 cannot
construct that processor object without torchvision, but its parts load fine.

Tests force the generated text (``forced_outputs``: id → text) with a logits processor, so everything else —
tokenizer, image processor, vision tower, batched ``generate``, decoding — is the real path.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

BACKENDS: dict[str, type["QwenVLBackend"]] = {}


def _register(cls):
    BACKENDS[cls.name] = cls
    return cls


class ForcedTextLogitsProcessor:
    """Makes ``generate`` emit given token sequences (then EOS) for chosen rows; other rows decode freely."""

    def __init__(self, sequences: Sequence[Sequence[int] | None], prompt_len: int, eos_id: int):
        self.sequences, self.prompt_len, self.eos_id = list(sequences), prompt_len, eos_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        for row, seq in enumerate(self.sequences):
            if seq is None:
                continue
            tok = seq[step] if step < len(seq) else self.eos_id
            scores[row, :] = float("-inf")
            scores[row, tok] = 0.0
        return scores


class QwenVLBackend:
    """Shared machinery; subclasses fix the output format and the patch grid."""

    name = "base"
    fmt = "qwen2vl"
    patch_size = 14
    merge_size = 2
    image_token = "<|image_pad|>"

    def __init__(self, model_path: str, *, prompt: str, prompt_version: str, model_name: str | None = None,
                 device: str = "auto", dtype: str = "auto", attn_implementation: str | None = "sdpa",
                 min_pixels: int = 56 * 56, max_pixels: int = 448 * 448, max_new_tokens: int = 256,
                 min_new_tokens: int | None = None, cache_implementation: str | None = None,
                 forced_outputs: Mapping[str, str] | str | None = None, model: Any = None, **_ignored: Any):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.model_path = str(model_path)
        self.model_name = model_name or Path(self.model_path).name
        self.prompt, self.prompt_version = prompt, prompt_version
        self.max_new_tokens, self.min_new_tokens = int(max_new_tokens), min_new_tokens
        self.cache_implementation = cache_implementation
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":  # bf16 on GPU; fp32 on CPU where bf16 matmuls are slow or missing
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer.padding_side = "left"  # decoder-only batching: prompts must end at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_processor = AutoImageProcessor.from_pretrained(
            self.model_path, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        self.patch_size = int(getattr(self.image_processor, "patch_size", self.patch_size))
        self.merge_size = int(getattr(self.image_processor, "merge_size", self.merge_size))
        self.chat_template = self._load_chat_template()
        if model is None:
            kwargs = {"dtype": self.dtype}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForImageTextToText.from_pretrained(self.model_path, **kwargs)
            model.to(self.device)
        self.model = model.eval()
        self._takes_mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self.forced = self._load_forced(forced_outputs)
        self.eos_ids = self._eos_ids()

    # -- setup helpers
    def _load_chat_template(self) -> str | None:
        for name in ("chat_template.jinja", "chat_template.json"):
            f = Path(self.model_path) / name
            if f.is_file():
                text = f.read_text(encoding="utf-8")
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        return getattr(self.tokenizer, "chat_template", None)

    @staticmethod
    def _load_forced(forced: Mapping[str, str] | str | None) -> dict[str, str]:
        if not forced:
            return {}
        if isinstance(forced, (str, os.PathLike)):
            with open(forced, encoding="utf-8") as f:
                return dict(json.load(f))
        return dict(forced)

    def _eos_ids(self) -> list[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) or self.tokenizer.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return [int(e) for e in eos] + ([im_end] if isinstance(im_end, int) and im_end not in eos else [])

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (patch × merge): 28 for Qwen2/2.5-VL, 32 for Qwen3-VL."""
        return self.patch_size * self.merge_size

    @property
    def annotator(self) -> dict:
        return {"model": self.model_name, "prompt": self.prompt_version, "backend": self.name}

    def frame(self, resized_width: int, resized_height: int) -> tuple[int, int]:
        """Coordinate frame of the model's numbers, for :func:`parse_grounding`."""
        return resized_width, resized_height

    # -- inputs
    def build_text(self, caption: str) -> str:
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self.prompt.format(caption=caption)}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.chat_template)

    def build_inputs(self, images: Sequence[np.ndarray], captions: Sequence[str]):
        """What ``Qwen2VLProcessor(text=..., images=..., padding=True)`` returns, for a batch."""
        import torch

        vision = self.image_processor(images=list(images), return_tensors="pt")
        grid = vision["image_grid_thw"]
        texts = []
        for i, caption in enumerate(captions):
            n_tokens = int(grid[i].prod()) // (self.merge_size ** 2)
            text = self.build_text(caption)
            texts.append(text.replace(self.image_token, "<|placeholder|>", 1).replace(
                "<|placeholder|>", self.image_token * n_tokens))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "pixel_values": vision["pixel_values"], "image_grid_thw": grid}
        if self._takes_mm_types:
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            inputs["mm_token_type_ids"] = (enc["input_ids"] == image_id).to(torch.int32)
        out = {}
        for k, v in inputs.items():
            v = v.to(self.device)
            out[k] = v.to(self.dtype) if k == "pixel_values" else v
        return out

    # -- generation
    def generate(self, images: Sequence[np.ndarray], captions: Sequence[str],
                 ids: Sequence[str] | None = None) -> list[str]:
        import torch

        inputs = self.build_inputs(images, captions)
        prompt_len = inputs["input_ids"].shape[1]
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = int(self.min_new_tokens)
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
        if self.forced and ids is not None:
            from transformers import LogitsProcessorList

            seqs = [self.tokenizer(self.forced[i], add_special_tokens=False)["input_ids"] if i in self.forced
                    else None for i in ids]
            kwargs["logits_processor"] = LogitsProcessorList(
                [ForcedTextLogitsProcessor(seqs, prompt_len, self.eos_ids[0])])
            kwargs["max_new_tokens"] = max(self.max_new_tokens, max((len(s) + 1 for s in seqs if s), default=0))
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, prompt_len:].cpu()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)  # grounding markers are special
        strip = {self.tokenizer.pad_token, *self.tokenizer.convert_ids_to_tokens(self.eos_ids)}
        return [_strip_tokens(t, strip) for t in texts]


def _strip_tokens(text: str, tokens: set) -> str:
    for tok in tokens:
        if tok:
            text = text.replace(tok, "")
    return text.strip()


@_register
class Qwen2VLBackend(QwenVLBackend):
    name, fmt = "qwen2vl", "qwen2vl"

    def frame(self, resized_width, resized_height):
        return 1000, 1000


@_register
class Qwen25VLBackend(QwenVLBackend):
    # Qwen2.5-VL writes absolute pixels of the image it was fed, i.e. the smart-resized input
    name, fmt = "qwen25vl", "qwen25vl"


@_register
class Qwen3VLBackend(QwenVLBackend):
    name, fmt = "qwen3vl", "json1000"
    patch_size = 16

    def frame(self, resized_width, resized_height):
        return 1000, 1000


def make_backend(cfg: Mapping[str, Any], prompts: Mapping[str, Any], model: Any = None) -> QwenVLBackend:
    """Build the backend named by ``cfg["name"]`` with the prompt ``prompts[name][cfg["prompt_version"]]``."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    version = str(cfg.pop("prompt_version"))
    try:
        prompt = prompts[name][version]
    except KeyError as e:
        raise ValueError(f"no prompt {version!r} for backend {name!r} in the config's prompts") from e
    return BACKENDS[name](cfg.pop("model_path"), prompt=prompt, prompt_version=f"{name}/{version}",
                          model=model, **cfg)
