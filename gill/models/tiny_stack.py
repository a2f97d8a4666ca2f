"""Build the `tiny` frozen stack: a complete Kolors-diffusers directory at toy dimensions.

Nothing here downloads anything. Every component is the *real* class (diffusers UNet/VAE/scheduler,
the diffusers-bundled ChatGLM text encoder and tokenizer, a transformers CLIP vision tower) at tiny
sizes, saved with `save_pretrained(..., safe_serialization=True)` in the real on-disk layout, so the
production loading code in `gill.models.stack` is exercised unchanged by tests and CPU smoke runs:

    <out_dir>/
      model_index.json          # as Kwai-Kolors/Kolors-diffusers has it
      unet/ vae/ scheduler/     # diffusers
      text_encoder/             # ChatGLMModel (2 layers, hidden 64)
      tokenizer/                # a real SentencePiece tokenizer.model trained here on Chinese text
      image_encoder/            # CLIPVisionModelWithProjection + preprocessor_config.json
                                # (Kolors-IP-Adapter ships its CLIP tower in the same place)

``layout="published"`` writes the same models the way `Kwai-Kolors/Kolors-diffusers` publishes its files
(DESIGN §3), so tests take the path a user's download takes: fp16 weights under the fp16 *variant* names
(``unet/diffusion_pytorch_model.fp16.safetensors``, ``vae/...fp16.safetensors``), the text encoder in exactly
three shards ``model.fp16-0000k-of-00003.safetensors`` with ``model.safetensors.index.fp16.json``, and the
vision tower as ``image_encoder/pytorch_model.bin`` (as Kolors-IP-Adapter-Plus ships it). The default
``layout="plain"`` keeps fp32 weights under the plain names.

Everything is seeded: two builds produce identical weights and an identical tokenizer.
Bump `TINY_VERSION` whenever the output changes so a stale cache (`~/.cache/gill/tiny-<version>`)
is never reused.
"""
from __future__ import annotations

import io
import itertools
import json
import os

import torch

TINY_VERSION = "v1"

# ChatGLMTokenizer appends these 9 tokens after the SentencePiece vocabulary
# ([MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>).
CHATGLM_NUM_SPECIAL_TOKENS = 9

TINY_SP_VOCAB_SIZE = 800
TINY_TEXT_SEQ_LENGTH = 256  # same max prompt length as Kolors (tokenizer max_length 256)

TINY_CHATGLM_CONFIG = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    kv_channels=16,
    num_attention_heads=4,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_qkv_bias=True,
    seq_length=TINY_TEXT_SEQ_LENGTH,
    original_rope=True,  # read by ChatGLMModel.__init__ but absent from ChatGLMConfig's defaults
    rmsnorm=True,
    post_layer_norm=True,
)

TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=32,
    encoder_hid_dim=64,  # = tiny ChatGLM hidden size (Kolors: 4096)
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8,  # pooled text (64) + 6 time ids x 8
    use_linear_projection=True,
    norm_num_groups=8,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.13025,  # Kolors/SDXL VAE value; 3 blocks -> spatial factor 4 (64px -> 16x16)
    force_upcast=True,
)

# Kolors' scheduler/scheduler_config.json (EulerDiscreteScheduler). Shared by every preset.
KOLORS_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1100,
    beta_start=0.00085,
    beta_end=0.014,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)

TINY_CLIP_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
TINY_CLIP_IMAGE_SIZE = 32

# Kolors-diffusers' model_index.json (image_encoder / feature_extractor are optional and null there).
KOLORS_MODEL_INDEX = {
    "_class_name": "KolorsPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": False,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SEED = 1234

LAYOUTS = ("plain", "published")
PUBLISHED_VARIANT = "fp16"
PUBLISHED_TEXT_ENCODER_SHARDS = 3  # Kolors-diffusers: model.fp16-0000{1,2,3}-of-00003.safetensors


# --------------------------------------------------------------------------------------------
# Tokenizer corpus + SentencePiece training
# --------------------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    """Deterministic Chinese corpus: every synthetic caption pattern plus the free text.

    Built from `gill.data.vocab` so every word the synthetic data set uses is a piece (or
    a few pieces) of the tiny vocabulary.
    """
    from gill.data.vocab import BACKGROUNDS, COLORS, EXTRA_TEXT, POSITIONS, SHAPES

    colors, bgs = list(COLORS), list(BACKGROUNDS)
    objects = [f"{c}{s}" for c in colors for s in SHAPES]  # 红色圆形 ...
    lines: list[str] = []
    for bg in bgs:
        lines.append(f"{bg}背景")
        for o in objects:
            lines.append(f"{bg}背景上有一个{o}")
        for o1, o2 in itertools.combinations(objects, 2):
            lines.append(f"{bg}背景上有一个{o1}和一个{o2}")
    for pos in POSITIONS:
        for o in objects:
            lines.append(f"{pos}是一个{o}")
            lines.append(f"{o}在{pos}")
    for o1, o2, o3 in itertools.islice(itertools.combinations(objects, 3), 0, None, 37):
        lines.append(f"画面中有一个{o1}、一个{o2}和一个{o3}。")
    for c in colors:
        lines.append(f"一个{c}的物体")
    lines.extend(EXTRA_TEXT)
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ,.!?;:()")
    # Extra weight on the free text so its characters get whole-character pieces.
    lines.extend(list(EXTRA_TEXT) * 20)
    return lines


def train_sentencepiece(lines: list[str], vocab_size: int = TINY_SP_VOCAB_SIZE) -> bytes:
    """Train a SentencePiece BPE model in-process; returns the serialized `tokenizer.model`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is small; take what it supports up to vocab_size
        character_coverage=1.0,  # keep every Chinese character seen
        byte_fallback=True,  # unseen characters still encode (as <0xXX> byte pieces) and round-trip
        split_digits=True,
        # Caption templates repeat a lot; without a cap BPE merges whole captions into one piece.
        max_sentencepiece_length=4,
        # ChatGLM's SPTokenizer uses unk as pad and needs bos/eos; ids 0/1/2 as in ChatGLM3.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # determinism
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        # No NFKC: it would turn full-width punctuation (，。) into ASCII and break exact round trips.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return buf.getvalue()


def _padded_vocab_size(sp_vocab: int) -> int:
    total = sp_vocab + CHATGLM_NUM_SPECIAL_TOKENS
    return (total + 63) // 64 * 64


# --------------------------------------------------------------------------------------------
# Weight init helpers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def init_chatglm_weights_(model: torch.nn.Module, std: float = 0.02) -> None:
    """Small-normal init for every ChatGLM parameter, RMSNorm weights = 1.

    ChatGLMPreTrainedModel._init_weights is a no-op, and RMSNorm allocates with torch.empty, so
    a model built from a config holds garbage until this runs (DESIGN §3).
    """
    from diffusers.pipelines.kolors.text_encoder import RMSNorm

    for p in model.parameters():
        p.normal_(0.0, std)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.fill_(1.0)


@torch.no_grad()
def _rerandomize_zero_weights_(model: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> list[str]:
    """Give any all-zero weight matrix/conv kernel small random values.

    Some diffusers layers can be zero-initialised (output projections); with those the tiny UNet's
    output would not depend on its inputs and the project's UNet-output comparisons would be vacuous.
    Norm biases (1-D) are legitimately zero and are left alone.
    """
    touched = []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
            touched.append(name)
    return touched


# --------------------------------------------------------------------------------------------
# Writers of the published layout
# --------------------------------------------------------------------------------------------
def save_sharded_variant(model, folder: str, variant: str = PUBLISHED_VARIANT,
                         num_shards: int = PUBLISHED_TEXT_ENCODER_SHARDS) -> list[str]:
    """``model.save_pretrained(folder, variant=...)`` split into exactly `num_shards` files named and
    indexed as transformers names them (``model.<variant>-0000k-of-0000n.safetensors`` +
    ``model.safetensors.index.<variant>.json``). transformers only shards by byte size, so the file it
    writes is re-split here into contiguous, about equal parts; the tensors and keys are its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save_pretrained(folder, variant=variant)
    single = os.path.join(folder, f"model.{variant}.safetensors")
    with safe_open(single, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {"format": "pt"}
    os.remove(single)
    # Keep the model's own parameter order (embedding first, output layer last), as real shards do.
    order = [k for k in model.state_dict() if k in tensors] + sorted(set(tensors) - set(model.state_dict()))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[]]
    done = 0
    for k in order:
        if shards[-1] and done >= total * len(shards) / num_shards and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(k)
        done += tensors[k].numel() * tensors[k].element_size()
    if len(shards) != num_shards:
        raise ValueError(f"cannot split {len(order)} tensors into {num_shards} shards")
    names = [f"model.{variant}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(folder, name), metadata=metadata)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, f"model.safetensors.index.{variant}.json"), "w") as f:
        json.dump(index, f, indent=2)
    return names


def save_pickle_checkpoint(model, folder: str) -> str:
    """``config.json`` + ``pytorch_model.bin`` (a torch.save'd state dict, tensors only), the format of
    checkpoints published before safetensors. transformers 5 no longer writes it, so it is written here."""
    model.config.save_pretrained(folder)
    path = os.path.join(folder, "pytorch_model.bin")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------
def build_tiny_chatglm(padded_vocab_size: int, seed: int = SEED):
    """The in-memory tiny ChatGLM (seeded); `build_tiny_stack` saves exactly this model."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    cfg = ChatGLMConfig(padded_vocab_size=padded_vocab_size, **TINY_CHATGLM_CONFIG)
    cfg.dtype = torch.float32  # written to config.json
    torch.manual_seed(seed)
    model = ChatGLMModel(cfg, empty_init=False)  # default skip_init would leave garbage
    init_chatglm_weights_(model)
    return model.eval()


def build_tiny_stack(out_dir: str, seed: int = SEED, layout: str = "plain") -> str:
    """Write the complete tiny Kolors-diffusers directory to `out_dir` (created); returns it.

    `layout`: "plain" (fp32, plain file names) or "published" (the Kolors-diffusers file layout, see the
    module docstring). Both hold the same seeded models. Not atomic by itself: `gill.models.stack` builds into a
    temp dir and renames it into the cache.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    published = layout == "published"

    def save_diffusers(model, sub: str) -> None:
        if published:
            model.to(torch.float16).save_pretrained(os.path.join(out_dir, sub), variant=PUBLISHED_VARIANT)
        else:
            model.save_pretrained(os.path.join(out_dir, sub), safe_serialization=True)

    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    # tokenizer/ ------------------------------------------------------------------------------
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    sp_model = train_sentencepiece(tokenizer_corpus())
    sp_path = os.path.join(tok_dir, "tokenizer.model")
    with open(sp_path, "wb") as f:
        f.write(sp_model)
    tokenizer = ChatGLMTokenizer(vocab_file=sp_path, padding_side="left")
    tokenizer.model_max_length = TINY_TEXT_SEQ_LENGTH
    tokenizer.save_pretrained(tok_dir)
    padded_vocab = _padded_vocab_size(tokenizer.vocab_size)  # vocab_size includes the 9 specials

    # text_encoder/ ---------------------------------------------------------------------------
    text_encoder = build_tiny_chatglm(padded_vocab, seed=seed)
    if published:
        text_encoder.config.dtype = torch.float16
        save_sharded_variant(text_encoder.to(torch.float16), os.path.join(out_dir, "text_encoder"))
    else:
        text_encoder.save_pretrained(os.path.join(out_dir, "text_encoder"), safe_serialization=True)

    # unet/ -----------------------------------------------------------------------------------
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    _rerandomize_zero_weights_(unet, gen)
    save_diffusers(unet, "unet")

    # vae/ ------------------------------------------------------------------------------------
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    _rerandomize_zero_weights_(vae, gen)
    save_diffusers(vae, "vae")

    # scheduler/ ------------------------------------------------------------------------------
    EulerDiscreteScheduler(**KOLORS_SCHEDULER_CONFIG).save_pretrained(os.path.join(out_dir, "scheduler"))

    # image_encoder/ (CLIP vision tower + its preprocessor) ------------------------------------
    torch.manual_seed(seed + 3)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG))
    enc_dir = os.path.join(out_dir, "image_encoder")
    if published:
        vision.config.dtype = torch.float16
        save_pickle_checkpoint(vision.to(torch.float16), enc_dir)
    else:
        vision.save_pretrained(enc_dir, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    ).save_pretrained(enc_dir)

    # model_index.json --------------------------------------------------------------------------
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(KOLORS_MODEL_INDEX, f, indent=2)
    with open(os.path.join(out_dir, "TINY_VERSION"), "w") as f:
        f.write(TINY_VERSION + ("" if layout == "plain" else f" {layout}") + "\n")
    return out_dir


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Write the tiny Kolors-diffusers directory.")
    ap.add_argument("out_dir", nargs="?", default="/tmp/gill-tiny")
    ap.add_argument("--layout", choices=LAYOUTS, default="plain")
    args = ap.parse_args()
    t0 = time.time()
    print(build_tiny_stack(args.out_dir, layout=args.layout), f"{time.time() - t0:.1f}s")
