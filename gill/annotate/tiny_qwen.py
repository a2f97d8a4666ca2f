"""A tiny but real Qwen2-VL, built locally so the annotation pipeline runs on CPU with no download (DESIGN §9).

``build_tiny_qwen2vl(path)`` writes a checkpoint directory in the layout of ``Qwen/Qwen2-VL-7B-Instruct``:
``config.json`` + safetensors weights of :class:`Qwen2VLForConditionalGeneration` at tiny dimensions, a
byte-level BPE tokenizer carrying the real special tokens (``<|im_start|>``, ``<|object_ref_start|>``,
``<|box_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...), the real chat template, and the
``preprocessor_config.json`` of :class:`Qwen2VLProcessor`. Everything loads back with the ordinary
``from_pretrained`` calls (no ``trust_remote_code``), so the backends cannot tell it from the real model.

Only the token ids differ from the release (ours are small so the embedding stays tiny); the config's
``image_token_id`` etc. point at our ids, exactly as the real config points at the real ones.
"""
from __future__ import annotations

from pathlib import Path

# Special tokens of the Qwen2-VL release, in its order (ids 151643..151656 there).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template shipped with Qwen2-VL-7B-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE is trained on: prompt words, digits and punctuation of grounding output, some Chinese.
_CORPUS = [
    "You are a helpful assistant.", "system user assistant",
    "Locate every object mentioned in the caption and output its bounding box.",
    "Caption: 一只橘猫趴在沙发上 一个红色的杯子放在木桌上 两只狗在草地上奔跑 蓝天白云 女孩 男人 汽车 树",
    '[{"bbox_2d": [12, 30, 550, 900], "label": "cat"}] ```json ``` (0,0),(1000,1000) 0123456789',
    "a cat on a sofa, a red cup on a table, two dogs run on the grass, blue sky",
]


def build_tokenizer():
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",  # generation needs left padding (DESIGN §8)
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer, vision_overrides=None, **text_overrides):
    """Qwen2VLConfig at tiny dimensions (or others via the overrides), token ids taken from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        # mrope sections (temporal, height, width) sum to head_dim/2 = 8, as 16/24/24 sum to 64 in the release
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    text.update(text_overrides)
    vision = dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision.update(vision_overrides or {})
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
    )


def build_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 448 * 448):
    """Qwen2-VL's image processor: the PIL flavour where it exists (it needs no torchvision)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers releases before the PIL/torchvision split
        from transformers import Qwen2VLImageProcessor as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def save_processor_files(path: Path, tokenizer, image_processor) -> None:
    """Write the processor's files the way ``Qwen2VLProcessor.save_pretrained`` lays them out.

    The processor object itself cannot be built without torchvision in transformers 5 (its constructor
    checks for ``VideoProcessorMixin``), so the parts are saved one by one; the files are the same.
    """
    import json

    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["processor_class"] = "Qwen2VLProcessor"
    # the release's name; AutoImageProcessor picks the PIL flavour itself where torchvision is missing
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def build_tiny_qwen2vl(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL checkpoint (model + processor) to ``path`` and return it."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    save_processor_files(path, tokenizer, build_image_processor())
    return path


if __name__ == "__main__":  # python -m gill.annotate.tiny_qwen OUT_DIR
    import sys

    print(build_tiny_qwen2vl(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2vl"))
