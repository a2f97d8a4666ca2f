"""Inference with a trained adapter: layout-controlled generation, captioning and retrieval.

    from gill.inference import load_trained, generate_layout, caption, RetrievalIndex
    model = load_trained("outputs/run/adapter.safetensors", {"pretrained_path": "/data/Kolors"})
    images = generate_layout(model, "一只橘猫趴在沙发上", [("橘猫", (0.1, 0.3, 0.55, 0.9))], seed=0)

CLI: ``python -m gill.inference {generate,caption,retrieve,chat} ...`` (see docs/inference.md).
"""
from gill.inference.captioning import beam_caption, caption, greedy_caption
from gill.inference.interleaved import Continuation, continue_prompt, generate_for_text
from gill.inference.layout_pipeline import build_pipeline, generate_layout
from gill.inference.loading import load_trained, model_config, read_metadata, save_adapter
from gill.inference.overlay import draw_layout
from gill.inference.retrieval import RetrievalIndex, embed_images, embed_texts, list_images

__all__ = [
    "Continuation", "RetrievalIndex", "beam_caption", "build_pipeline", "caption", "continue_prompt", "draw_layout",
    "embed_images", "embed_texts", "generate_for_text", "generate_layout", "greedy_caption", "list_images",
    "load_trained", "model_config", "read_metadata", "save_adapter",
]
