"""``GillModel``: the frozen Kolors stack + the adapter behind one interface, ``model(batch, mode)``.

The frozen modules are registered as submodules (so DeepSpeed moves and casts them with the
rest) but never train: they stay in eval mode whatever ``.train()`` says, and their parameters
have ``requires_grad=False``. Turning a collated batch (PIL images, strings, boxes) into tensors
happens here; the three losses live in :mod:`gill.models.modes`.
"""
from __future__ import annotations

import collections
import contextlib
import logging

import numpy as np
import torch
from torch import nn

from gill.models import modes
from gill.models.adapter import GillAdapter
from gill.models.chatglm import encode_prompt
from gill.training.compile import ADAPTER_REGIONS, BLOCK_REGIONS, REGIONS, compile_regions
from gill.models.stack import KolorsStack  # noqa: F401  (the type load_stack returns)

log = logging.getLogger(__name__)

MODES = ("captioning", "retrieval", "generation")


# ---- the frozen encoders' outputs (training and the encoder cache share these) ------------------
def vae_scale_factor(vae) -> int:
    """Pixels per latent side of a diffusers AutoencoderKL (one halving per block but the last), as diffusers'
    pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def vae_posterior(vae, images) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior of PIL images (pre-scaling), on the VAE's device and
    in its dtype. Pixels: RGB / 127.5 - 1, as diffusers' SDXL training does."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)
    # One image per encode: the encoder's no-grad peak (~1.5 GiB per 1024² image) then does not grow
    # with the micro-batch, and one 1024² image already fills the GPU.
    dists = [vae.encode(p[None].to(vae.device, vae.dtype)).latent_dist for p in pixels]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


@torch.no_grad()
def clip_image_embeds(vision, image_processor, images) -> torch.Tensor:
    """CLIP ``image_embeds`` ``[B, Dv]`` of PIL images, on the tower's device and in its dtype."""
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return vision(pixel_values=pixels.to(vision.device, vision.dtype)).image_embeds


@torch.no_grad()
def vocab_mean_norm(text_encoder) -> float:
    """Mean L2 norm of the frozen input-embedding rows (GILL rescales its ``[IMG]`` rows to it)."""
    return text_encoder.embedding.word_embeddings.weight.float().norm(dim=-1).mean().item()


class PhraseCache:
    """ChatGLM pooled vectors of object labels, cached by label string (bounded LRU).

    Labels repeat across a dataset ("红色圆形", "猫"), and the frozen encoder gives the same
    vector every time, so each is encoded once.
    """

    def __init__(self, capacity: int = 50_000):
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def __call__(self, model: "GillModel", labels: list[list[str]], num_slots: int) -> torch.Tensor:
        missing = sorted({lab for row in labels for lab in row if lab not in self._cache})
        for lab in missing:
            # One label at a time (padded to a length set by the label alone): a label's vector must not
            # depend on which other labels happened to be encoded with it (padding changes the arithmetic
            # in the last bits, and that would make a resumed run differ from an uninterrupted one).
            _, pooled = encode_prompt(
                model.text_encoder, model.tokenizer, [lab], model.phrase_max_length, model.device, padding="longest"
            )
            self._cache[lab] = pooled[0]
        out = torch.zeros(len(labels), num_slots, model.llm_dim, device=model.device, dtype=model.dtype)
        for i, row in enumerate(labels):
            for j, lab in enumerate(row[:num_slots]):
                self._cache.move_to_end(lab)
                out[i, j] = self._cache[lab]
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out


class GillModel(nn.Module):
    def __init__(self, stack: KolorsStack, cfg):
        """``cfg``: the ``model`` config group (``adapter``, lengths, dropouts, checkpointing)."""
        super().__init__()
        self.unet = stack.unet
        self.vae = stack.vae
        self.text_encoder = stack.text_encoder
        self.vision = stack.vision
        self.tokenizer = stack.tokenizer
        self.image_processor = stack.image_processor
        self.noise_scheduler = stack.noise_scheduler
        for frozen in (self.unet, self.vae, self.text_encoder, self.vision):
            frozen.requires_grad_(False).eval()

        self.llm_dim = self.text_encoder.config.hidden_size
        self.prompt_max_length = cfg.prompt_max_length
        self.phrase_max_length = cfg.phrase_max_length
        self.caption_max_tokens = cfg.caption_max_tokens
        self.caption_dropout = cfg.caption_dropout
        self.layout_dropout = cfg.layout_dropout
        self.timestep_high_noise = float(cfg.get("timestep_high_noise", 0.0))
        self.mapper_loss_weight = cfg.mapper_loss_weight
        self.diffusion_loss_weight = cfg.diffusion_loss_weight
        self.adapter = GillAdapter(
            cfg.adapter,
            llm_dim=self.llm_dim,
            vision_dim=self.vision.config.projection_dim,
            prompt_len=cfg.prompt_max_length,
            unet=self.unet,
            vocab_norm=vocab_mean_norm(self.text_encoder),
        )
        # GILL weights its caption + [IMG0] cross-entropy by 0.5 in retrieval and generation
        self.lm_loss_weight = float(cfg.adapter.get("lm_loss_weight", 0.5))
        self.adapter.spatial.attach(self.unet)
        self.phrases = PhraseCache(cfg.phrase_cache_size)
        self._empty_prompt = None
        self._encoders_parked: torch.device | None = None  # see park_frozen_encoders
        # Random draws (noise, timesteps, dropouts, VAE sampling) come from this generator, whose
        # state is checkpointed: resume continues the exact same stream.
        self.rng = torch.Generator().manual_seed(0)
        if cfg.gradient_checkpointing.unet:
            self.unet.enable_gradient_checkpointing()
        if cfg.gradient_checkpointing.text_encoder:
            self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compiled_regions = []
        if cfg.get("compile", False):
            whole = bool(cfg.get("compile_blocks", False))
            if whole and not self.adapter.spatial.block_traceable:
                log.info("model.compile_blocks: the %s injection compiles attention and feed-forward modules one "
                         "by one", self.adapter.spatial.injection)
                whole = False
            self.compiled_regions = compile_regions(self.text_encoder, self.unet,
                                                    regions=REGIONS + (BLOCK_REGIONS if whole else ()))
            if cfg.get("compile_adapter", False) and not whole:  # compiled whole, a block holds its injection
                self.compiled_regions += compile_regions(self.adapter.spatial, regions=ADAPTER_REGIONS)

    # ---- housekeeping -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.unet, self.vae, self.text_encoder, self.vision):
            frozen.eval()
        return self

    def seed(self, seed: int) -> None:
        self.rng.manual_seed(seed)

    def clear_text_caches(self) -> None:
        """Forget the cached ChatGLM encodings (object labels, the empty prompt): after the frozen text
        encoder changed (quantized) or the model moved to another device or dtype."""
        self.phrases = PhraseCache(self.phrases.capacity)
        self._empty_prompt = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .bfloat16(): encodings cached before were made in the old device and dtype
        self.clear_text_caches()
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.adapter.img_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict, mode: str) -> dict:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.adapter.refresh()
        return getattr(modes, mode)(self, batch)

    # ---- inputs ----------------------------------------------------------------------------------
    def upload(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor on the model's device without stalling the GPU (pinned, non-blocking copy:
        a pageable copy waits for the queued kernels, and the GPU then idles while Python catches up)."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, dtype, non_blocking=True)

    def rand(self, *shape) -> torch.Tensor:
        return self.upload(torch.rand(*shape, generator=self.rng))

    def randn(self, *shape) -> torch.Tensor:
        return self.upload(torch.randn(*shape, generator=self.rng), self.dtype)

    @torch.no_grad()
    def vision_features(self, batch: dict) -> torch.Tensor:
        """CLIP image embeddings ``[B, Dv]`` (precomputed ``vision_features`` in the batch win, e.g.
        from the encoder cache, :mod:`gill.data.encoder_cache`)."""
        if "vision_features" in batch:
            return self.upload(batch["vision_features"], self.dtype)
        return clip_image_embeds(self.vision, self.image_processor, batch["images"]).to(self.device, self.dtype)

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """VAE latents, scaled: ``(mean + std * noise) * scaling_factor``, noise from :attr:`rng`.

        The posterior comes from the batch's ``latent_mean`` / ``latent_std`` (the encoder cache)
        or from encoding ``images``; either way the same noise is drawn from the same stream, so a
        cached run samples exactly what an image run samples. Precomputed ``latents`` (already
        sampled and scaled) win over both.
        """
        if "latents" in batch:
            return self.upload(batch["latents"], self.dtype)
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            mean, std = vae_posterior(self.vae, batch["images"])
        mean, std = self.upload(mean), self.upload(std)
        noise = self.upload(torch.randn(mean.shape, generator=self.rng), mean.dtype)
        return (mean + std * noise).mul(self.vae.config.scaling_factor).to(self.dtype)

    # ---- the frozen encoders off the accelerator (encoder cache) ----------------------------------
    def park_frozen_encoders(self, device="cpu") -> int:
        """Move the VAE and the CLIP tower to ``device`` (CPU): with the encoder cache, training
        never runs them, so they need no accelerator memory. Returns the bytes of weights moved.
        Call it after ``deepspeed.initialize`` (which moves and broadcasts every parameter).
        :meth:`frozen_encoders_on_device` brings them back for validation/inference."""
        moved = sum(p.numel() * p.element_size() for m in (self.vae, self.vision) for p in m.parameters())
        self.vae.to(device)
        self.vision.to(device)
        self._encoders_parked = torch.device(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return moved

    @contextlib.contextmanager
    def frozen_encoders_on_device(self):
        """While inside: the VAE and the CLIP tower are on :attr:`device` (a no-op unless parked)."""
        parked = self._encoders_parked
        if parked is None or parked == self.device:
            yield
            return
        self.vae.to(self.device)
        self.vision.to(self.device)
        try:
            yield
        finally:
            self.vae.to(parked)
            self.vision.to(parked)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def prompt_encoding(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompt(self.text_encoder, self.tokenizer, captions, self.prompt_max_length, self.device)

    def caption_encoding(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Kolors' encoding of the batch's captions: from the encoder cache (``prompt_embeds`` / ``prompt_pooled``,
        ``cache.prompts``) when the batch has it, else ChatGLM's pass now."""
        if "prompt_embeds" in batch:
            return self.upload(batch["prompt_embeds"], self.dtype), self.upload(batch["prompt_pooled"], self.dtype)
        return self.prompt_encoding(batch["captions"])

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of "" — what a dropped caption becomes (and Kolors' unconditional input)."""
        if self._empty_prompt is None:
            self._empty_prompt = self.prompt_encoding([""])
        return self._empty_prompt

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    def time_ids(self, batch: dict, resolution: int) -> torch.Tensor:
        """Kolors/SDXL micro-conditioning: original size, crop top-left, target size."""
        b = len(batch["captions"])
        orig = batch.get("original_size", torch.full((b, 2), resolution))
        crop = batch.get("crop_top_left", torch.zeros(b, 2, dtype=torch.long))
        target = torch.full((b, 2), resolution)
        return torch.cat((orig, crop, target), dim=1).to(self.device, self.dtype)
