"""Retrieval with the trained projections: text -> images from an index, image -> captions.

Both sides land in the shared space the retrieval mode trains (cosine similarity, the InfoNCE
logits without the temperature, which does not change rankings):

* image: CLIP vision features -> ``adapter.image_proj`` -> L2-normalized;
* text: caption + ``[IMG]`` -> ChatGLM -> hidden states at ``[IMG]`` -> ``adapter.text_proj`` at
  the first ``[IMG]`` position (GILL; ``adapter.retrieval_embedding: mean`` averages all ``r``) ->
  L2-normalized.

An index on disk is a directory with ``embeddings.safetensors`` (fp32 ``[N, d]``) and ``paths.json``
(the N image paths as given, UTF-8); no pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from gill.models.modes import text_embedding

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FORMAT = "gill-retrieval-index-v1"


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive, sorted). Symlinks or names resolving outside the
    folder are skipped, so an index of a folder only ever contains that folder's files."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    out = []
    for dirpath, _, files in os.walk(root):  # os.walk does not follow directory symlinks
        for name in files:
            path = Path(dirpath, name)
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.resolve().is_relative_to(root):
                out.append(str(path))
    return sorted(out)


@torch.no_grad()
def embed_images(model, images: Sequence[Image.Image]) -> torch.Tensor:
    """``[B, d]`` normalized fp32 image embeddings."""
    feats = model.vision_features({"images": [im.convert("RGB") for im in images]})
    return F.normalize(model.adapter.image_proj(feats).float(), dim=-1)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``[B, d]`` normalized fp32 text embeddings (through the ``[IMG]`` tokens)."""
    texts = list(texts)
    out = []
    for start in range(0, len(texts), batch_size):
        txt = text_embedding(model, texts[start : start + batch_size])
        out.append(F.normalize(txt.float(), dim=-1))
    return torch.cat(out)


def _top_k(scores: torch.Tensor, names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return [[(names[j], float(s)) for s, j in zip(row_s.tolist(), row_j.tolist())] for row_s, row_j in zip(top.values, top.indices)]


class RetrievalIndex:
    """Normalized image embeddings + their paths."""

    def __init__(self, embeddings: torch.Tensor, paths: Sequence[str]):
        if embeddings.shape[0] != len(paths):
            raise ValueError(f"{embeddings.shape[0]} embeddings but {len(paths)} paths")
        self.embeddings = embeddings.float().cpu()
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def build(
        cls, model, images: str | os.PathLike | Sequence[str | os.PathLike | Image.Image], batch_size: int = 32
    ) -> "RetrievalIndex":
        """Embed a folder (its image files), a list of image paths, or a list of PIL images
        (named ``<image i>`` in the index)."""
        if isinstance(images, (str, os.PathLike)):
            images = list_images(images)
        names, chunks = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pil = []
            for i, item in enumerate(batch, start):
                if isinstance(item, Image.Image):
                    pil.append(item)
                    names.append(f"<image {i}>")
                else:
                    with Image.open(item) as im:
                        pil.append(im.convert("RGB"))
                    names.append(str(item))
            chunks.append(embed_images(model, pil).cpu())
        if not chunks:
            raise ValueError("no images to index")
        return cls(torch.cat(chunks), names)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.contiguous()}, str(d / "embeddings.safetensors"), metadata={"format": INDEX_FORMAT})
        (d / "paths.json").write_text(json.dumps(self.paths, ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RetrievalIndex":
        d = Path(directory)
        emb = load_file(str(d / "embeddings.safetensors"))["embeddings"]
        paths = json.loads((d / "paths.json").read_text(encoding="utf-8"))
        return cls(emb, paths)

    def query_text(self, model, texts: str | Sequence[str], k: int = 5):
        """Top-``k`` ``(path, cosine)`` per text; a single string gives a single list."""
        single = isinstance(texts, str)
        hits = self.query_embeddings(embed_texts(model, [texts] if single else texts), k)
        return hits[0] if single else hits

    def query_embeddings(self, q: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(path, cosine)`` for each normalized query embedding ``[B, d]``."""
        q = q.float().cpu()
        if q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"index has dim {self.embeddings.shape[1]} but the model embeds to {q.shape[1]}: another adapter?")
        return _top_k(q @ self.embeddings.T, self.paths, k)

    @staticmethod
    def query_image(model, image: Image.Image, captions: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
        """Rank ``captions`` for ``image``: top-``k`` ``(caption, cosine)``. Needs no index."""
        q = embed_images(model, [image]).cpu()
        return _top_k(q @ embed_texts(model, captions).cpu().T, list(captions), k)[0]
