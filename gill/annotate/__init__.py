"""Layout annotation: image–caption pairs → layout JSONL with a grounding VLM (DESIGN §7, §8).

``python -m gill.annotate source.kind=tsv source.path=... source.image_root=... output.path=...``
(Hydra; primary config ``conf/annotate.yaml``). Library use: :func:`run_annotation`. See docs/annotate.md.
"""
from gill.annotate.pipeline import run_annotation

__all__ = ["run_annotation"]
