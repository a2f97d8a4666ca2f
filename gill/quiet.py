"""Silence the known harmless warnings that every run printed, each by its exact message.

Each one below was checked to be noise for this project; anything else still prints:

* transformers, once per processor class: "`CLIPImageProcessor` requires torchvision (not installed); falling
  back to `CLIPImageProcessorPil`". The PIL backend is the one this project uses on CPU on purpose (no
  torchvision build matches the pinned CPU torch), and it gives the same inputs.
* torch, per mapper built: "enable_nested_tensor is True, but self.use_nested_tensor is False because
  encoder_layer.norm_first was True". The mapper's encoder is pre-norm by design (GILL's GILLMapper); the
  nested-tensor fast path only applies to post-norm inference, so there is nothing to gain.
* transformers, once: "`past_key_values`/`cache_params` are deprecated. Use `cache` instead." Raised by
  diffusers' ChatGLM (Kolors' text encoder) building its outputs with the old keyword; this project never reads
  that cache.

Installed on ``import gill``, so training, annotation, inference and the tools all get it.
"""
from __future__ import annotations

import logging
import re
import warnings

# (logger name, regex on the message) for transformers' logging
_LOG_MESSAGES = (
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"),
    ("transformers.utils.generic", re.escape("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")),
)
_WARNINGS = (
    (UserWarning, r"enable_nested_tensor is True, but self\.use_nested_tensor is False because encoder_layer\.norm_first was True"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_installed = False


def install() -> None:
    """Add the filters (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for name, pattern in _LOG_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    for category, pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
