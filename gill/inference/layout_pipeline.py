"""Layout-controlled text-to-image generation: diffusers' ``KolorsPipeline`` + the spatial adapter.

The pipeline is built from the loaded stack's own modules and driven with conditioning computed
here (ChatGLM's encoding of the prompt, or the GILL mapper's output when ``use_mapper``), so all
of Kolors' sampling details (Euler steps, micro-conditioning time ids, guidance) stay diffusers'.
The layout enters through the UNet hooks of :class:`~gill.models.spatial_adapter.SpatialAdapter`:

* classifier-free guidance: ``KolorsPipeline`` concatenates ``[negative, positive]`` along the
  batch (``torch.cat([negative_prompt_embeds, prompt_embeds])`` and ``torch.cat([latents] * 2)``),
  then ``noise_pred.chunk(2)`` -> ``(uncond, text)``. The layout is therefore set for the doubled
  batch with the *null* layout (every slot masked, i.e. the learned null tokens training uses for
  layout dropout) in the first half and the real layout in the second.
* scheduled sampling (GLIGEN): the adapter is on for the first ``beta`` fraction of the steps, then
  ``callback_on_step_end`` clears the layout and the frozen Kolors finishes alone.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from gill.data.boxes import normalize_bbox

LayoutObjects = Sequence[tuple[str, Sequence[float]]]


def build_pipeline(model):
    """A ``KolorsPipeline`` sharing ``model``'s frozen modules (nothing is copied)."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    # The stack's scheduler folder is Kolors' Euler config; the training DDPM scheduler keeps it.
    scheduler = EulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    pipe = KolorsPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_size(model) -> tuple[int, int]:
    """Kolors' native ``(height, width)``: the UNet's sample size times the VAE's downscale."""
    side = model.unet.config.sample_size * model.vae_scale_factor
    return side, side


def normalize_objects(objects: LayoutObjects, box_unit: str, width: int, height: int) -> list[tuple[str, tuple]]:
    """``(label, box)`` pairs in any supported unit -> normalized boxes (pixels refer to the output)."""
    return [(str(label), normalize_bbox(box, box_unit, width=width, height=height)) for label, box in objects]


def prompt_conditioning(model, prompt: str, negative_prompt: str = "", use_mapper: bool = False):
    """``(prompt_embeds, pooled, negative_prompt_embeds, negative_pooled)``, each with batch 1.

    With ``use_mapper`` the positive side comes from the LLM: caption + ``[IMG]`` -> ChatGLM ->
    GILL mapper. The negative side is always ChatGLM's encoding: the mapper was trained to imitate
    that space, and ``""`` encoded by ChatGLM is the unconditional input Kolors (and caption
    dropout in training) uses.
    """
    from gill.models.modes import img_token_hidden

    if use_mapper:
        tokens, pooled = model.adapter.map_to_conditioning(img_token_hidden(model, [prompt]))
    else:
        tokens, pooled = model.prompt_encoding([prompt])
    neg_tokens, neg_pooled = model.empty_prompt() if negative_prompt == "" else model.prompt_encoding([negative_prompt])
    return tokens.to(model.dtype), pooled.to(model.dtype), neg_tokens.to(model.dtype), neg_pooled.to(model.dtype)


def set_guided_layout(model, objects: list[tuple[str, tuple]], batch: int, guided: bool):
    """Set the layout for a UNet batch of ``batch`` images (``2 * batch`` rows when ``guided``).

    Guided rows are ordered as ``KolorsPipeline`` orders them: unconditional first (null layout),
    conditional second (the real layout). No image size is needed: the adapter builds each block's
    box mask on the token grid that block runs on, so any height and width work (non-square too).
    """
    n = len(objects)
    phrases = model.phrases(model, [[label for label, _ in objects]], n).expand(batch, -1, -1)
    boxes = torch.tensor([box for _, box in objects], device=model.device, dtype=torch.float32)[None].expand(batch, -1, -1)
    mask = torch.ones(batch, n, dtype=torch.bool, device=model.device)
    if guided:
        phrases = torch.cat((torch.zeros_like(phrases), phrases))
        boxes = torch.cat((boxes, boxes))
        mask = torch.cat((torch.zeros_like(mask), mask))
    model.adapter.spatial.set_layout(phrases, boxes, mask)


class _LayoutOff:
    """``callback_on_step_end`` that switches the adapter off after ``steps_on`` denoising steps."""

    def __init__(self, spatial, steps_on: int):
        self.spatial, self.steps_on = spatial, steps_on

    def __call__(self, pipe, i, t, callback_kwargs):
        if i + 1 >= self.steps_on:
            self.spatial.clear_layout()
        return callback_kwargs


@torch.no_grad()
def generate_layout(
    model,
    prompt: str,
    objects: LayoutObjects = (),
    *,
    negative_prompt: str = "",
    steps: int = 30,
    guidance_scale: float = 5.0,
    beta: float = 0.3,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    use_mapper: bool = False,
    box_unit: str = "norm",
):
    """Generate ``num_images`` PIL images of ``prompt`` with ``objects`` = ``[(phrase, box), ...]``.

    ``box_unit``: ``norm`` | ``1000`` | ``pixel`` | ``xywh_pixel`` (pixels of the output image).
    ``beta``: fraction of the steps with the layout adapter on (0 = plain Kolors).
    Image ``i`` uses the seed ``seed + i``, so any one image can be reproduced alone. The seed used
    is stored in each image's ``info["seed"]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    default_h, default_w = default_size(model)
    height, width = height or default_h, width or default_w
    objs = normalize_objects(objects, box_unit, width, height)
    seed = random.randrange(2**31) if seed is None else int(seed)

    pipe = build_pipeline(model)
    guided = guidance_scale > 1 and model.unet.config.time_cond_proj_dim is None  # the pipeline's own test
    tokens, pooled, neg_tokens, neg_pooled = prompt_conditioning(model, prompt, negative_prompt, use_mapper)
    # Pre-expanded to num_images with num_images_per_prompt=1: given prompt_embeds, KolorsPipeline
    # repeats only the pooled vectors per image, which would leave the batch sizes inconsistent.
    rep = lambda x: x.expand(num_images, *x.shape[1:]).contiguous()  # noqa: E731
    steps_on = round(beta * steps) if objs else 0
    spatial = model.adapter.spatial
    spatial.clear_layout()
    try:
        if steps_on > 0:
            set_guided_layout(model, objs, num_images, guided)
        latents = pipe(
            prompt_embeds=rep(tokens),
            pooled_prompt_embeds=rep(pooled),
            negative_prompt_embeds=rep(neg_tokens),
            negative_pooled_prompt_embeds=rep(neg_pooled),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            output_type="latent",
            callback_on_step_end=_LayoutOff(spatial, steps_on),
        ).images
    finally:
        spatial.clear_layout()
    images = decode_latents(model, pipe, latents)
    for i, im in enumerate(images):
        im.info["seed"] = seed + i
    return images


def decode_latents(model, pipe, latents: torch.Tensor):
    """Scaled latents -> PIL images. Decoded here rather than by the pipeline because its decode
    assumes latents and VAE share a dtype, and the VAE is kept out of fp16 (it gives NaN there)."""
    vae = model.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")
