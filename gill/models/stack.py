"""Load the frozen Kolors stack (UNet, VAE, ChatGLM text encoder + tokenizer, noise scheduler, CLIP vision).

Three presets, selected by `model_cfg.name` (DESIGN §3, §9):

* ``kolors``        – a diffusers-format Kolors directory (`Kwai-Kolors/Kolors-diffusers` layout) at
                      `pretrained_path`, plus a CLIP vision tower directory at `vision_path`.
* ``tiny``          – the same layout at toy size, built by `gill.models.tiny_stack` into `cache_dir` on first use
                      (unless `pretrained_path` points at one) and then loaded through *exactly* the same
                      `from_pretrained` code path as ``kolors``.
* ``kolors_random`` – real Kolors dimensions with random weights, constructed directly on the target device
                      and dtype (no files); for memory/speed benchmarks. Its tokenizer is the tiny
                      SentencePiece tokenizer: all its ids are < 65024, so they are valid for the full-size
                      ChatGLM embedding, but the text is of course not the real ChatGLM3 tokenization.

Every module is frozen: ``requires_grad_(False)``, ``.eval()``, cast to the dtype, moved to the device.
No ``trust_remote_code`` anywhere: ChatGLM comes from ``diffusers.pipelines.kolors``.

Weight files (DESIGN §3): Kolors-diffusers publishes only fp16 *variant* files
(``diffusion_pytorch_model.fp16.safetensors``, a 3-shard ``model.fp16-0000k-of-00003.safetensors`` text
encoder with ``model.safetensors.index.fp16.json``). Each component folder is probed for the
``model.variant`` files first and the plain names second (:func:`find_weights`), and the libraries' own
``variant=`` argument loads what was found; the choice is logged per component. A vision tower that ships
only ``pytorch_model.bin`` (Kolors-IP-Adapter-Plus) is read by transformers with ``weights_only=True``:
tensors only, no code runs while unpickling.

The parameter table of a preset (stack and adapter): ``python -m gill.tools.params model=kolors_random``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gill.models.tiny_stack import (
    KOLORS_SCHEDULER_CONFIG,
    TINY_VERSION,
    build_tiny_stack,
    init_chatglm_weights_,
)

log = logging.getLogger(__name__)

KOLORS_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# What from_pretrained reads in a folder, single file or sharded index (diffusers / transformers names).
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TRANSFORMERS_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# ---- real Kolors dimensions (Kolors-diffusers configs), used by `kolors_random` ----------------
KOLORS_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' legacy name: these are head *counts* (64-dim heads)
    cross_attention_dim=2048,
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=5632,  # 4096 pooled + 6 x 256 time ids
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)

SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

CHATGLM3_6B_CONFIG = dict(
    num_layers=28,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_qkv_bias=True,
    padded_vocab_size=65024,
    seq_length=32768,
    rmsnorm=True,
    post_layer_norm=True,
    original_rope=True,
)

CLIP_VIT_L14_336_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)


@dataclass
class KolorsStack:
    """The frozen pretrained components. Nothing in here ever trains."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # diffusers.pipelines.kolors.ChatGLMModel (sequence-first inside)
    tokenizer: Any  # diffusers.pipelines.kolors.ChatGLMTokenizer (pads LEFT)
    noise_scheduler: Any  # diffusers.DDPMScheduler, from the scheduler/ folder config (training)
    vision: Any  # transformers.CLIPVisionModelWithProjection
    image_processor: Any  # transformers.CLIPImageProcessor
    path: str | None  # diffusers-format directory it was loaded from (None for kolors_random)

    def modules(self) -> dict[str, nn.Module]:
        """name -> frozen nn.Module (tokenizer/scheduler/processor are not modules)."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "vision": self.vision}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _cfg_get(cfg, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        val = cfg.get(key, default)
    else:  # omegaconf DictConfig or any attribute container
        val = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if val is None else val


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """"bf16" | "fp16" | "fp32" | "auto" (bf16 on CUDA, fp32 otherwise) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected bf16 | fp16 | fp32 | auto")
    return table[name]


def _vae_dtype(dtype: torch.dtype) -> torch.dtype:
    # The SDXL/Kolors VAE decodes to NaN in fp16 (DESIGN §3); bf16/fp32 are fine.
    return torch.float32 if dtype == torch.float16 else dtype


def _freeze(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    # Only cast when needed: from_pretrained already loaded in `dtype`, and a redundant `.to(dtype)`
    # makes diffusers warn about its keep-in-fp32 modules.
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device too)."""
    return sum(p.numel() for p in module.parameters())


def parameter_table(rows: list[tuple[str, int]]) -> str:
    """Markdown table of (component, parameter count) rows plus a total row."""
    lines = ["| component | parameters | billions |", "|---|---:|---:|"]
    for name, n in rows:
        lines.append(f"| {name} | {n:,} | {n / 1e9:.3f} |")
    total = sum(n for _, n in rows)
    lines.append(f"| **total** | {total:,} | {total / 1e9:.3f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Construct parameters directly in the target dtype (no fp32 copy of a 9B-param stack).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# tiny: build-once cache
# ------------------------------------------------------------------------------------------------
def default_tiny_cache_dir(layout: str = "plain") -> str:
    suffix = "" if layout == "plain" else f"-{layout}"
    return os.path.join(os.path.expanduser("~"), ".cache", "gill", f"tiny-{TINY_VERSION}{suffix}")


def ensure_tiny_stack(cache_dir: str | None = None, layout: str = "plain") -> str:
    """Return a built tiny stack directory, building it on first use.

    `layout`: "plain" or "published" (the Kolors-diffusers file names and fp16 weights,
    :func:`gill.models.tiny_stack.build_tiny_stack`).

    Race-safe across ranks/processes: each builder writes a private temp dir next to the target and
    renames it into place; rename onto an existing non-empty directory fails, so the first finisher
    wins and the others discard their copy. A directory is only ever visible complete.
    """
    final = os.path.abspath(os.path.expanduser(cache_dir or default_tiny_cache_dir(layout)))
    if os.path.isfile(os.path.join(final, "model_index.json")):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    try:
        build_tiny_stack(tmp, layout=layout)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is meant to be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (or an empty dir sat there); use theirs if complete.
            if not os.path.isfile(os.path.join(final, "model_index.json")):
                if os.path.isdir(final) and not os.listdir(final):
                    os.rmdir(final)
                    os.rename(tmp, final)
                else:
                    raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# which weight files a component folder holds
# ------------------------------------------------------------------------------------------------
def add_variant(name: str, variant: str | None) -> str:
    """The libraries' variant file name: ``model.safetensors`` -> ``model.fp16.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.fp16.json`` (diffusers and
    transformers both insert the variant before the last suffix)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


@dataclass(frozen=True)
class WeightFiles:
    """The weights `from_pretrained` will read in one component folder."""

    folder: str
    name: str  # the file, or the index of sharded weights
    variant: str | None  # pass as from_pretrained(variant=...)
    safetensors: bool  # False: a pickle checkpoint, read with weights_only=True



# The variant in a file name: "model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16.safetensors",
# "model.fp16-00001-of-00003.safetensors" -> "fp16" (for the error message's hint only).
_VARIANT_RE = re.compile(r"\.(?:safetensors|bin)\.index\.([\w-]+)\.json$"
                         r"|\.([\w-]+?)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$")


def find_weights(folder: str, variant: str | None, names: tuple[str, ...],
                 pickle_names: tuple[str, ...] = (), component: str = "") -> WeightFiles:
    """The weight files of `folder`: the `variant` ones if present, the plain names otherwise;
    safetensors before pickle (`pickle_names`, only where a loader allows them).

    Raises FileNotFoundError naming the folder, what was looked for, what is there, and the
    ``model.variant`` that would match when only other variants are present.
    """
    variants = [variant, None] if variant else [None]
    candidates = [(n, v, True) for v in variants for n in names]
    candidates += [(n, v, False) for v in variants for n in pickle_names]
    for name, v, safe in candidates:
        path = add_variant(name, v)
        if os.path.isfile(os.path.join(folder, path)):
            return WeightFiles(folder, path, v, safe)
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = sorted({m.group(1) or m.group(2) for f in present if (m := _VARIANT_RE.search(f))})
    hint = f"; it holds variant(s) {found}: set model.variant={found[0]}" if found else ""
    raise FileNotFoundError(
        f"{component or 'weights'}: no weight file in {folder!r}: looked for "
        f"{[add_variant(n, v) for n, v, _ in candidates]}, found {present}{hint}"
    )


def _log_weights(component: str, wf: WeightFiles, dtype: torch.dtype) -> None:
    how = "" if wf.safetensors else "a pickle read with weights_only=True, "
    log.info("%s: %s (in %s, %sloaded as %s)", component, wf.name, wf.folder, how, dtype)


# ------------------------------------------------------------------------------------------------
# loading from a diffusers-format directory (tiny and kolors share this)
# ------------------------------------------------------------------------------------------------
def check_kolors_dir(path: str, variant: str | None = None) -> dict[str, WeightFiles]:
    """Raise FileNotFoundError naming whatever a Kolors-diffusers directory lacks; returns the
    weight files of unet / vae / text_encoder (`variant` files where present, plain names otherwise)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Kolors pretrained_path {path!r} is not a directory")
    missing = [s for s in KOLORS_SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(
            f"Kolors directory {path!r} is missing subfolder(s) {missing}; expected the Kolors-diffusers "
            f"layout: model_index.json + {list(KOLORS_SUBFOLDERS)}"
        )
    if not os.path.isfile(os.path.join(path, "tokenizer", "tokenizer.model")):
        raise FileNotFoundError(f"{path}/tokenizer/tokenizer.model (SentencePiece model) is missing")
    return {
        "unet": find_weights(os.path.join(path, "unet"), variant, DIFFUSERS_WEIGHTS, component="unet"),
        "vae": find_weights(os.path.join(path, "vae"), variant, DIFFUSERS_WEIGHTS, component="vae"),
        "text_encoder": find_weights(os.path.join(path, "text_encoder"), variant, TRANSFORMERS_WEIGHTS,
                                     component="text_encoder"),
    }


def check_vision_dir(path: str, variant: str | None = None) -> WeightFiles:
    """Raise FileNotFoundError naming whatever a CLIP vision directory lacks; returns its weight files
    (safetensors first; a ``pytorch_model.bin`` as Kolors-IP-Adapter-Plus/image_encoder ships it otherwise)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP vision_path {path!r} is not a directory")
    for f in ("config.json", "preprocessor_config.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"CLIP vision directory {path!r} is missing {f}")
    return find_weights(path, variant, TRANSFORMERS_WEIGHTS, TRANSFORMERS_PICKLE_WEIGHTS, component="vision")


def _load_diffusers(cls, wf: WeightFiles, component: str, dtype: torch.dtype):
    _log_weights(component, wf, dtype)
    return cls.from_pretrained(wf.folder, variant=wf.variant, use_safetensors=True, torch_dtype=dtype)


def _load_transformers(cls, wf: WeightFiles, component: str, dtype: torch.dtype):
    _log_weights(component, wf, dtype)
    # weights_only=True is transformers' default; spelled out because a .bin is a pickle.
    return cls.from_pretrained(wf.folder, variant=wf.variant, use_safetensors=wf.safetensors,
                               weights_only=True, dtype=dtype)


def _load_vision(wf: WeightFiles, device, dtype: torch.dtype):
    """The frozen CLIP vision tower (+ projection) and its image processor, from one folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    vision = _load_transformers(CLIPVisionModelWithProjection, wf, "vision", dtype)
    return _freeze(vision, device, dtype), CLIPImageProcessor.from_pretrained(wf.folder)


def _load_from_dir(path: str, vision_path: str, device, dtype: torch.dtype,
                   variant: str | None = None) -> KolorsStack:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel

    weights = check_kolors_dir(path, variant)
    vision_weights = check_vision_dir(vision_path, variant)
    # from_pretrained casts the (fp16, as published) files to the run dtype while loading.
    unet = _load_diffusers(UNet2DConditionModel, weights["unet"], "unet", dtype)
    vae = _load_diffusers(AutoencoderKL, weights["vae"], "vae", _vae_dtype(dtype))
    text_encoder = _load_transformers(ChatGLMModel, weights["text_encoder"], "text_encoder", dtype)
    tokenizer = load_tokenizer(path)
    # Training uses DDPM's add_noise with Kolors' betas (1100 steps, scaled_linear); sampling code builds
    # its own Euler scheduler from the same folder.
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vision, image_processor = _load_vision(vision_weights, device, dtype)
    return KolorsStack(
        unet=_freeze(unet, device, dtype),
        vae=_freeze(vae, device, _vae_dtype(dtype)),
        text_encoder=_freeze(text_encoder, device, dtype),
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        vision=vision,
        image_processor=image_processor,
        path=path,
    )


# ------------------------------------------------------------------------------------------------
# kolors_random: real dimensions, random weights, built in place
# ------------------------------------------------------------------------------------------------
RANDOM_COMPONENTS = ("unet", "vae", "text_encoder", "vision")


def build_random_modules(device="cpu", dtype: torch.dtype = torch.bfloat16, seed: int | None = None,
                         only: tuple[str, ...] = RANDOM_COMPONENTS) -> dict[str, nn.Module]:
    """UNet / VAE / ChatGLM3-6B / CLIP ViT-L/14-336 at real size with random weights.

    Built under ``torch.device(device)`` with the default dtype set to `dtype`, so the 9B parameters
    are allocated once, on the device, in the final dtype. On "meta" nothing is allocated (counting).
    With `seed`, each component draws from its own seeded stream (``seed + its index``): the same seed
    gives the same weights on the same device type and torch version, whichever components are built
    (the encoder cache builds only the VAE and the vision tower).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    meta = torch.device(device).type == "meta"

    def chatglm():
        te = ChatGLMModel(ChatGLMConfig(**CHATGLM3_6B_CONFIG), empty_init=False)
        if not meta:
            init_chatglm_weights_(te)  # _init_weights is a no-op; RMSNorm is torch.empty
        return te

    builders = {
        "unet": lambda: UNet2DConditionModel(**KOLORS_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
        "text_encoder": chatglm,
        "vision": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_336_CONFIG)),
    }
    out: dict[str, nn.Module] = {}
    for i, name in enumerate(RANDOM_COMPONENTS):
        if name not in only:
            continue
        dev = torch.device(device)
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        seeded = torch.random.fork_rng(devices=cuda, enabled=seed is not None and not meta)
        with seeded, torch.device(device), _default_dtype(_vae_dtype(dtype) if name == "vae" else dtype):
            if seed is not None and not meta:
                torch.manual_seed(seed + i)
            out[name] = builders[name]()
    return out


def random_image_processor():
    from transformers import CLIPImageProcessor

    size = CLIP_VIT_L14_336_CONFIG["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _load_random(device, dtype: torch.dtype, cache_dir: str | None, seed: int | None = None) -> KolorsStack:
    from diffusers import DDPMScheduler

    mods = build_random_modules(device, dtype, seed)
    # The tiny SentencePiece tokenizer: ids < 65024, so valid inputs for the full-size embedding.
    tokenizer = load_tokenizer(ensure_tiny_stack(cache_dir))
    return KolorsStack(
        unet=_freeze(mods["unet"], device, dtype),
        vae=_freeze(mods["vae"], device, _vae_dtype(dtype)),
        text_encoder=_freeze(mods["text_encoder"], device, dtype),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(KOLORS_SCHEDULER_CONFIG),
        vision=_freeze(mods["vision"], device, dtype),
        image_processor=random_image_processor(),
        path=None,
    )


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def resolve_stack_paths(model_cfg, build: bool = True) -> tuple[str, str]:
    """``(pretrained_path, vision_path)`` of a ``tiny`` or ``kolors`` config, as :func:`load_stack`
    reads them. ``build=False``: never build the tiny stack (its path is returned even if absent)."""
    name = _cfg_get(model_cfg, "name", "tiny")
    pretrained = _cfg_get(model_cfg, "pretrained_path")
    vision_path = _cfg_get(model_cfg, "vision_path")
    cache_dir = _cfg_get(model_cfg, "cache_dir")
    if name == "tiny":
        if pretrained:
            path = os.path.expanduser(pretrained)
        elif build:
            path = ensure_tiny_stack(cache_dir)
        else:
            path = os.path.abspath(os.path.expanduser(cache_dir or default_tiny_cache_dir()))
        vision_path = os.path.expanduser(vision_path) if vision_path else os.path.join(path, "image_encoder")
        return path, vision_path
    if name == "kolors":
        if not pretrained:
            raise ValueError("model.pretrained_path must point at a Kolors-diffusers directory for name=kolors")
        if not vision_path:
            raise ValueError("model.vision_path must point at a CLIP ViT-L/14-336 vision directory for name=kolors")
        return os.path.expanduser(pretrained), os.path.expanduser(vision_path)
    raise ValueError(f"model {name!r} has no weights on disk; expected tiny | kolors")


def load_stack(model_cfg, device="cpu", dtype=None) -> KolorsStack:
    """Load the frozen stack described by `model_cfg` (keys: name, pretrained_path, vision_path,
    variant, cache_dir, dtype, quantize). `dtype` overrides `model_cfg.dtype`; both default to "auto"."""
    name = _cfg_get(model_cfg, "name", "tiny")
    dtype = resolve_dtype(dtype if dtype is not None else _cfg_get(model_cfg, "dtype", "auto"), device)
    if name == "kolors_random":
        stack = _load_random(device, dtype, _cfg_get(model_cfg, "cache_dir"), _cfg_get(model_cfg, "seed"))
    elif name in ("tiny", "kolors"):
        stack = _load_from_dir(*resolve_stack_paths(model_cfg), device, dtype, _cfg_get(model_cfg, "variant"))
    else:
        raise ValueError(f"unknown model name {name!r}; expected tiny | kolors | kolors_random")
    _quantize(stack.text_encoder, model_cfg)
    return stack


def _quantize(text_encoder: nn.Module, model_cfg) -> None:
    """``model.quantize.text_encoder`` applied in place (weight-only; null: left as loaded)."""
    from gill.models.quantize import quantize_text_encoder

    scheme = _cfg_get(_cfg_get(model_cfg, "quantize"), "text_encoder")
    if scheme:
        n = quantize_text_encoder(text_encoder, scheme)
        log.info("text_encoder: %d transformer linears quantized to %s (weight-only)", n, scheme)


def _random_seed(model_cfg, what: str) -> int:
    """kolors_random's seed: a component built alone must be the training run's, so it needs one."""
    seed = _cfg_get(model_cfg, "seed")
    if seed is None:
        raise ValueError(f"model=kolors_random needs model.seed for its {what} to be the training run's")
    return seed


def load_frozen_encoders(model_cfg, device="cpu", dtype=None):
    """Only the VAE and the CLIP vision tower (+ its image processor) of a ``tiny``/``kolors`` stack,
    loaded, cast and frozen exactly as :func:`load_stack` does: what the encoder cache
    (``python -m gill.tools.build_encoder_cache``) runs, without the UNet and ChatGLM. Returns ``(vae, vision, processor)``."""
    from diffusers import AutoencoderKL

    dtype = resolve_dtype(dtype if dtype is not None else _cfg_get(model_cfg, "dtype", "auto"), device)
    if _cfg_get(model_cfg, "name") == "kolors_random":
        mods = build_random_modules(device, dtype, _random_seed(model_cfg, "encoders"), only=("vae", "vision"))
        return (_freeze(mods["vae"], device, _vae_dtype(dtype)), _freeze(mods["vision"], device, dtype),
                random_image_processor())
    variant = _cfg_get(model_cfg, "variant")
    path, vision_path = resolve_stack_paths(model_cfg)
    weights = check_kolors_dir(path, variant)
    vision_weights = check_vision_dir(vision_path, variant)
    vae = _load_diffusers(AutoencoderKL, weights["vae"], "vae", _vae_dtype(dtype))
    vision, processor = _load_vision(vision_weights, device, dtype)
    return _freeze(vae, device, _vae_dtype(dtype)), vision, processor


def load_tokenizer(path: str):
    """ChatGLM's tokenizer from ``<path>/tokenizer``, left-padding as KolorsPipeline uses it. kolors_random borrows the
    tiny stack's (its ids are valid inputs for the full-size embedding)."""
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(os.path.join(path, "tokenizer"), padding_side="left")


def load_text_encoder(model_cfg, device="cpu", dtype=None):
    """Only ChatGLM and its tokenizer, loaded, cast, frozen and quantized exactly as :func:`load_stack` does: what the
    encoder cache runs for the prompt encodings (``cache.prompts``). Returns ``(text_encoder, tokenizer)``."""
    from diffusers.pipelines.kolors import ChatGLMModel

    dtype = resolve_dtype(dtype if dtype is not None else _cfg_get(model_cfg, "dtype", "auto"), device)
    if _cfg_get(model_cfg, "name") == "kolors_random":
        seed = _random_seed(model_cfg, "text encoder")
        te = build_random_modules(device, dtype, seed, only=("text_encoder",))["text_encoder"]
        tokenizer = load_tokenizer(ensure_tiny_stack(_cfg_get(model_cfg, "cache_dir")))
    else:
        path, _ = resolve_stack_paths(model_cfg)
        wf = check_kolors_dir(path, _cfg_get(model_cfg, "variant"))["text_encoder"]
        te, tokenizer = _load_transformers(ChatGLMModel, wf, "text_encoder", dtype), load_tokenizer(path)
    te = _freeze(te, device, dtype)
    _quantize(te, model_cfg)
    return te, tokenizer


def stack_parameter_rows(stack_or_modules) -> list[tuple[str, int]]:
    mods = stack_or_modules.modules() if isinstance(stack_or_modules, KolorsStack) else stack_or_modules
    return [(name, count_parameters(m)) for name, m in mods.items()]
