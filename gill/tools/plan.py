"""Memory planner: the predicted per-GPU peak of one training step, before anything loads.

    python -m gill.tools.plan model=kolors_random train.resolution=1024 train.micro_batch_size=1 \\
        [--world-size 3] [--card-gib 24] [--cached] [--optimizer deepspeed|torch] [other Hydra overrides]

prints the peak broken down and whether it fits the card. With ``--fit`` it instead picks, for the card, the
micro-batch and gradient checkpointing (:func:`fit`) and prints the overrides that select them. How each term is
obtained:

* **frozen weights** — the bytes of the frozen modules built on the meta device (nothing is
  allocated), as stored: the dtype's bytes, one byte per weight of an int8-quantized ChatGLM linear
  (``model.quantize.text_encoder=int8``). With ``--cached`` (VAE latents and CLIP features precomputed
  offline) the VAE and the vision tower stay off the GPU.
* **trainables, gradients, optimizer state** — the adapter's parameter count (built on meta) x bytes
  per parameter of the strategy: plain PyTorch AdamW on bf16 parameters (the seed), DeepSpeed
  ZeRO-0 (bf16 weights + grads, fp32 master/grad/Adam moments), ZeRO-2 (the fp32 part divided by the
  world size) and ZeRO-2 with the optimizer offloaded (the fp32 part in CPU memory).
* **communication buffers** — ZeRO-2's gradient bucket (``reduce_bucket_size`` elements of bf16, twice
  with ``overlap_comm``), capped at the trainable count.
* **activations, per mode** — *traced*, not guessed: the frozen ChatGLM / UNet (+ the real spatial
  adapter hooked in) run once on the meta device at the configured shapes under a
  ``saved_tensors_hooks`` counter, which records every tensor autograd keeps for backward (frozen
  weights excluded: they are already counted). Gradient checkpointing is applied analytically from
  the same trace: what is saved outside the checkpointed units (UNet ResNet/transformer blocks,
  ChatGLM layers) + each unit's input + the largest unit's internals (recomputed during backward).
  On top comes a **transient** term for the backward's working set (gradients of activations):
  ``TRANSIENT_FACTOR`` x the largest single saved tensor — a calibrated constant (below).
  Generation with raw images also has the VAE encoder's no-grad peak (three full-resolution
  128-channel maps: ``VAE_ENCODE_MAPS``), and the ChatGLM prompt encoding's hidden states. A compiled net
  that is not checkpointed keeps less than its eager trace (``COMPILED_SAVED``, calibrated).
* **CUDA context** — CUDA/cuBLAS/NCCL state outside PyTorch's allocator (a constant).
* **allocator slack** — ``max_memory_reserved`` exceeds ``max_memory_allocated`` by fragmentation.

Calibrated constants (honest about where they come from; see benchmarks/NOTES.md):

* ``TRANSIENT_FACTOR``, ``ALLOCATOR_SLACK`` — fitted to the H200 per-mode peaks of
  benchmarks/step_benchmark.json (kolors_random, 1024², micro-batch 1-8);
* ``COMPILED_SAVED`` — fitted to the two uncapped trainer rows without recomputation (mb 16 and 20);
* ``CUDA_CONTEXT_GIB`` — typical size for torch 2.x + NCCL on Ada/Hopper cards; not measured by the
  benchmark (outside ``max_memory_reserved``, which is what the 24 GiB emulation caps).

The CPU test (tests/test_plan.py) measures the tiny stack's real parameter, gradient, optimizer and
saved-activation bytes and requires the plan to be within 10% of them on several configs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 2**30
CUDA_CONTEXT_GIB = 0.6
ALLOCATOR_SLACK = 0.03  # reserved / allocated - 1 (H200 rows: 0.5-3.4%)
TRANSIENT_FACTOR = 2.0  # backward working set, in units of the largest saved tensor
VAE_ENCODE_MAPS = 6  # no-grad VAE encode peak, in [B, 128, H, W] bf16 maps (H200: 1.3-1.55 GiB per 1024² image)
# Saved activations of a compiled (model.compile), not checkpointed net over its eager trace: Inductor's partitioner
# recomputes cheap pointwise results in backward instead of keeping them. Fitted to the uncapped Kolors rows without
# recomputation (benchmarks/NOTES.md: run 18 mb 16, 0.764; run 21 mb 20, 0.765); checkpointed nets keep only their
# units' inputs, which compiling does not change (the capped recipe plans within -1.8% without it).
COMPILED_SAVED = 0.765
MODES = ("captioning", "retrieval", "generation")


# ------------------------------------------------------------------------------------------------
# the modules, on the meta device
# ------------------------------------------------------------------------------------------------
def frozen_modules(model_cfg, dtype: torch.dtype) -> dict[str, nn.Module]:
    """UNet / VAE / ChatGLM / CLIP vision at the config's dimensions, on the meta device (memoised:
    building them takes seconds and meta modules hold no state the planner changes)."""
    quant = model_cfg.get("quantize") or {}
    return _frozen_modules(str(model_cfg.name), dtype, quant.get("text_encoder"))


@functools.lru_cache(maxsize=4)
def _frozen_modules(name: str, dtype: torch.dtype, te_quant: str | None = None) -> dict[str, nn.Module]:
    from gill.models.quantize import quantize_text_encoder
    from gill.models.stack import build_random_modules

    if name in ("kolors", "kolors_random"):
        # Kolors' dimensions (a real Kolors checkpoint has exactly these; see gill.models.stack).
        mods = build_random_modules("meta", dtype)
    elif name == "tiny":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from gill.models import tiny_stack as ts
        from gill.models.stack import _default_dtype

        vocab = ts._padded_vocab_size(ts.TINY_SP_VOCAB_SIZE)
        with torch.device("meta"), _default_dtype(dtype):
            mods = {
                "unet": UNet2DConditionModel(**ts.TINY_UNET_CONFIG),
                "vae": AutoencoderKL(**ts.TINY_VAE_CONFIG),
                "text_encoder": ChatGLMModel(ChatGLMConfig(padded_vocab_size=vocab, **ts.TINY_CHATGLM_CONFIG),
                                             empty_init=False),
                "vision": CLIPVisionModelWithProjection(CLIPVisionConfig(**ts.TINY_CLIP_VISION_CONFIG)),
            }
    else:
        raise ValueError(f"unknown model name {name!r}")
    for m in mods.values():
        m.requires_grad_(False).eval()
    quantize_text_encoder(mods["text_encoder"], te_quant)
    return mods


def build_adapter(model_cfg, mods: dict[str, nn.Module], dtype: torch.dtype):
    from gill.models.adapter import GillAdapter

    te, vision = mods["text_encoder"], mods["vision"]
    with torch.device("meta"):
        adapter = GillAdapter(model_cfg.adapter, llm_dim=te.config.hidden_size,
                              vision_dim=vision.config.projection_dim,
                              prompt_len=model_cfg.prompt_max_length, unet=mods["unet"])
    return adapter.to(dtype)


# ------------------------------------------------------------------------------------------------
# counting what autograd saves
# ------------------------------------------------------------------------------------------------
def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorCounter:
    """Counts the distinct storages autograd saves for backward (frozen parameters excluded),
    attributing each to the innermost *unit* module running when it was saved, and records the
    bytes of each unit's first input (what a checkpoint keeps). Works on meta and real tensors."""

    def __init__(self, exclude: list[nn.Module], units: list[nn.Module] = ()):
        self.excluded = {_key(t) for m in exclude for t in [*m.parameters(), *m.buffers()]}
        self.units = list(units)
        self.stack: list[int] = []
        self.sizes: dict[int, int] = {}
        self.owner: dict[int, int] = {}  # storage -> unit index (-1 outside)
        self.unit_inputs: dict[int, int] = {}  # storage -> bytes, inputs of units
        self.handles = []
        # Storages are keyed by address: holding each counted one keeps a freed one's address from being
        # reused by a later tensor within the trace (which would merge two tensors into one count).
        self._held: list = []

    def _pack(self, t):
        if isinstance(t, torch.Tensor):
            k = _key(t)
            if k not in self.excluded:
                self._held.append(t.untyped_storage())
                self.sizes[k] = max(self.sizes.get(k, 0), t.untyped_storage().nbytes())
                self.owner.setdefault(k, self.stack[-1] if self.stack else -1)
        return t

    def __enter__(self):
        for i, u in enumerate(self.units):
            def pre(mod, args, kwargs, i=i):
                self.stack.append(i)
                x = args[0] if args else next(iter(kwargs.values()))
                if isinstance(x, torch.Tensor):
                    self._held.append(x.untyped_storage())
                    self.unit_inputs[_key(x)] = x.untyped_storage().nbytes()

            def post(mod, args, out, i=i):
                self.stack.pop()

            self.handles.append(u.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(u.register_forward_hook(post))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self._held.clear()

    # ---- results ----------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def largest(self) -> int:
        return max(self.sizes.values(), default=0)

    def checkpointed(self) -> int:
        """Saved bytes if every unit were checkpointed: outside + unit inputs + largest unit."""
        outside = sum(s for k, s in self.sizes.items() if self.owner[k] == -1)
        per_unit: dict[int, int] = {}
        for k, s in self.sizes.items():
            if self.owner[k] >= 0:
                per_unit[self.owner[k]] = per_unit.get(self.owner[k], 0) + s
        inputs = sum(s for k, s in self.unit_inputs.items() if self.owner.get(k, -2) != -1)
        return outside + inputs + max(per_unit.values(), default=0)


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing on meta: what the GPU's flash / memory-efficient kernels
    keep for backward (q, k, v, the output and an fp32 log-sum-exp per query), not the attention
    matrix that the math fallback (which meta dispatch picks) would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # never run: the trace has no backward
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention_on_meta():
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# ------------------------------------------------------------------------------------------------
# the per-mode graphs at the configured shapes
# ------------------------------------------------------------------------------------------------
@dataclass
class ModeActivation:
    saved: int  # bytes autograd keeps (after checkpointing)
    transient: int  # backward working set + no-grad peaks of the mode
    parts: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def seq_lengths(model_cfg) -> dict[str, int]:
    """Longest ChatGLM sequences with grad, per mode (captions at caption_max_tokens), as ChatGLM runs them:
    padded to a multiple of ``SEQ_MULTIPLE``."""
    from gill.models.chatglm import SEQ_MULTIPLE

    cap, k, r = int(model_cfg.caption_max_tokens), int(model_cfg.adapter.prefix_tokens), int(model_cfg.adapter.img_tokens)
    lengths = {"captioning": 2 + k + cap + 1, "img": 2 + cap + r}
    return {mode: -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE for mode, n in lengths.items()}


def trace_chatglm(te: nn.Module, b: int, s: int, dtype, ckpt: bool, device="meta", exclude=()) -> tuple[int, int]:
    """(saved bytes, largest tensor) of one ChatGLM pass with grad w.r.t. its input embeddings."""
    from gill.models.chatglm import run_chatglm

    units = list(te.encoder.layers)
    with torch.device(device):
        embeds = torch.zeros(b, s, te.config.hidden_size, dtype=dtype, requires_grad=True) * 1.0
        mask = torch.ones(b, s, dtype=torch.long)
    with SavedTensorCounter([te, *exclude], units) as c:
        run_chatglm(te, embeds, mask)  # the explicit mask needs no values: it runs on the meta device too
    return (c.checkpointed() if ckpt else c.total), c.largest


def trace_lm_head(te: nn.Module, n_rows: int, dtype, device="meta") -> tuple[int, int]:
    """The vocabulary head + fp32 cross-entropy on n_rows labelled positions (captioning's caption CE, and the
    [IMG] modes' GILL LM loss on the caption and [IMG0]; the r [IMG] output columns are negligible)."""
    import torch.nn.functional as F

    with torch.device(device):
        h = torch.zeros(n_rows, te.config.hidden_size, dtype=dtype, requires_grad=True) * 1.0
        tgt = torch.zeros(n_rows, dtype=torch.long)
    with SavedTensorCounter([te]) as c:
        F.cross_entropy(te.output_layer(h).float(), tgt)
    return c.total, c.largest


def trace_unet(unet: nn.Module, adapter, b: int, latent: int, n_obj: int, prompt_len: int, dtype, ckpt: bool,
               device="meta") -> tuple[int, int]:
    """(saved bytes, largest tensor) of the UNet forward with the spatial adapter hooked in."""
    units = [m for m in unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    spatial = adapter.spatial
    spatial.attach(unet)
    try:
        with torch.device(device):
            cross = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            x = torch.zeros(b, 4, latent, latent, dtype=dtype)
            t = torch.zeros(b, dtype=torch.long)
            ctx = torch.zeros(b, prompt_len, cross, dtype=dtype)
            added = {"text_embeds": torch.zeros(b, pooled, dtype=dtype), "time_ids": torch.zeros(b, 6, dtype=dtype)}
            phrases = torch.zeros(b, n_obj, adapter.spatial.tokenizer.null_phrase.shape[0], dtype=dtype)
            boxes = torch.zeros(b, n_obj, 4)
            mask = torch.ones(b, n_obj, dtype=torch.bool)
        with SavedTensorCounter([unet, adapter], units) as c:
            spatial.set_layout(phrases, boxes, mask, (latent, latent))
            out = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            (out.float() - 0).pow(2).mean()  # the MSE's saved input
    finally:
        spatial.clear_layout()
        spatial.detach()
    return (c.checkpointed() if ckpt else c.total), c.largest


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    config: dict
    gpu: dict  # component -> bytes (static)
    cpu: dict
    modes: dict  # mode -> ModeActivation
    card_gib: float

    @property
    def activation_peak(self) -> int:
        return max((m.peak for m in self.modes.values()), default=0)

    @property
    def allocated_peak(self) -> int:
        return sum(self.gpu.values()) + self.activation_peak

    @property
    def reserved_peak(self) -> int:
        return int(self.allocated_peak * (1 + ALLOCATOR_SLACK))

    @property
    def device_peak(self) -> int:
        return self.reserved_peak + int(CUDA_CONTEXT_GIB * GiB)

    @property
    def fits(self) -> bool:
        return self.device_peak <= self.card_gib * GiB

    def table(self) -> str:
        g = lambda n: f"{n / GiB:8.3f}"  # noqa: E731
        lines = [f"plan: {self.config}", "", "| component | GiB | where |", "|---|---:|---|"]
        for k, v in self.gpu.items():
            lines.append(f"| {k} | {g(v)} | GPU |")
        for mode, a in self.modes.items():
            lines.append(f"| activations: {mode} (saved {a.saved / GiB:.3f} + transient {a.transient / GiB:.3f}) "
                         f"| {g(a.peak)} | GPU |")
        for k, v in self.cpu.items():
            lines.append(f"| {k} | {g(v)} | CPU |")
        lines += [
            f"| **allocated peak** (static + largest mode) | {g(self.allocated_peak)} | GPU |",
            f"| allocator slack ({100 * ALLOCATOR_SLACK:.0f}%) -> **reserved peak** | {g(self.reserved_peak)} | GPU |",
            f"| CUDA context | {g(int(CUDA_CONTEXT_GIB * GiB))} | GPU |",
            f"| **device peak** | {g(self.device_peak)} | GPU |",
            "",
            f"{'FITS' if self.fits else 'DOES NOT FIT'} a {self.card_gib:g} GiB card "
            f"({(self.card_gib * GiB - self.device_peak) / GiB:+.2f} GiB headroom)",
        ]
        return "\n".join(lines)


def optimizer_bytes(strategy: str, n: int, world: int, ds: dict | None, esize: int = 2) -> tuple[dict, dict]:
    """(GPU parts, CPU parts) for ``n`` trainable parameters of ``esize`` bytes under a strategy."""
    gpu, cpu = {"trainables": esize * n, "gradients": esize * n}, {}
    if strategy == "torch":  # the seed: AdamW moments in the parameters' dtype
        gpu["optimizer: AdamW moments"] = 2 * esize * n
        return gpu, cpu
    zero = (ds or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    part = n if stage == 0 else -(-n // world)
    fp32 = {"optimizer: fp32 master": 4 * part, "optimizer: Adam moments (fp32)": 8 * part,
            "optimizer: fp32 gradient partition": 4 * part}
    (cpu if offload and stage >= 1 else gpu).update(fp32)
    if stage >= 1:
        bucket = min(int(float(zero.get("reduce_bucket_size", 5e8))), n) * esize
        gpu["comm: gradient bucket" + (" x2 (overlap_comm)" if zero.get("overlap_comm") else "")] = (
            bucket * (2 if zero.get("overlap_comm") else 1))
    return gpu, cpu


def plan(cfg, world_size: int = 1, card_gib: float = 24.0, cached: bool = False, optimizer: str = "deepspeed",
         dtype: torch.dtype = torch.bfloat16) -> Plan:
    """The per-GPU memory plan of one optimizer step for the composed config ``cfg``."""
    from gill.models.quantize import frozen_bytes
    from gill.training.ds_config import load_ds_file

    mc, tr = cfg.model, cfg.train
    b, res = int(tr.micro_batch_size), int(tr.resolution)
    modes = list(tr.modes)
    esize = torch.finfo(dtype).bits // 8
    mods = frozen_modules(mc, dtype)
    adapter = build_adapter(mc, mods, dtype)
    n_train = sum(p.numel() for p in adapter.parameters())
    on_gpu = ["unet", "text_encoder"] + ([] if cached else ["vae", "vision"])
    gpu = {f"frozen {k}": frozen_bytes(mods[k]) for k in on_gpu}
    ds = None if optimizer == "torch" else load_ds_file(cfg.deepspeed.file)
    if ds is not None and cfg.deepspeed.get("overrides"):
        from omegaconf import OmegaConf

        from gill.training.ds_config import _merge
        ds = _merge(ds, OmegaConf.to_container(cfg.deepspeed.overrides, resolve=True))
    g, c = optimizer_bytes(optimizer if optimizer == "torch" else "deepspeed", n_train, world_size, ds, esize)
    gpu.update(g)

    with fused_attention_on_meta():
        acts = _mode_activations(mc, modes, mods, adapter, b, res, cached, dtype, esize)
    desc = dict(model=mc.name, resolution=res, micro_batch=b, world_size=world_size, cached=cached,
                optimizer=optimizer if optimizer == "torch" else cfg.deepspeed.file,
                ckpt_unet=bool(mc.gradient_checkpointing.unet), ckpt_text_encoder=bool(mc.gradient_checkpointing.text_encoder),
                trainable_params=n_train)
    return Plan(desc, gpu, c, acts, card_gib)


# Gradient checkpointing choices (UNet, ChatGLM), least recomputation first.
CHECKPOINTING = ((False, False), (True, False), (True, True))
FIT_MICRO_BATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


def fit(cfg, world_size: int = 1, card_gib: float = 24.0, cached: bool = False, optimizer: str = "deepspeed",
        dtype: torch.dtype = torch.bfloat16) -> tuple[dict | None, list[dict]]:
    """The micro-batch and checkpointing to train ``cfg`` with on a card of ``card_gib``: for each choice of
    :data:`CHECKPOINTING`, the largest of :data:`FIT_MICRO_BATCHES` whose predicted device peak fits; the pick
    is the largest micro-batch, with the least recomputation among equals (on the 24 GiB card the bigger
    checkpointed micro-batch was the faster step: benchmarks/NOTES.md). Returns (pick or None, one row per
    choice: ``ckpt_unet``, ``ckpt_text_encoder``, ``micro_batch`` (0: not even 1 fits), ``device_peak_gib``)."""
    from omegaconf import OmegaConf, open_dict

    rows = []
    for ck_unet, ck_te in CHECKPOINTING:
        best = None
        for b in FIT_MICRO_BATCHES:
            c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            with open_dict(c):
                c.train.micro_batch_size = b
                c.model.gradient_checkpointing.unet = ck_unet
                c.model.gradient_checkpointing.text_encoder = ck_te
            p = plan(c, world_size, card_gib, cached, optimizer, dtype)
            if not p.fits:
                break
            best = (b, p.device_peak / GiB)
        rows.append({"ckpt_unet": ck_unet, "ckpt_text_encoder": ck_te, "micro_batch": best[0] if best else 0,
                     "device_peak_gib": round(best[1], 3) if best else None})
    fitting = [r for r in rows if r["micro_batch"]]
    pick = max(fitting, key=lambda r: r["micro_batch"], default=None)  # max keeps the first of equals
    return pick, rows


def fit_overrides(pick: dict) -> list[str]:
    return [f"train.micro_batch_size={pick['micro_batch']}",
            f"model.gradient_checkpointing.unet={str(pick['ckpt_unet']).lower()}",
            f"model.gradient_checkpointing.text_encoder={str(pick['ckpt_text_encoder']).lower()}"]


def _mode_activations(mc, modes, mods, adapter, b, res, cached, dtype, esize) -> dict:
    te, unet, vae = mods["text_encoder"], mods["unet"], mods["vae"]
    ck_te, ck_unet = bool(mc.gradient_checkpointing.text_encoder), bool(mc.gradient_checkpointing.unet)
    compiled = bool(mc.get("compile", False))

    def kept(saved: int, ckpt: bool) -> int:  # what a compiled, not checkpointed net keeps of its eager trace
        return int(saved * COMPILED_SAVED) if compiled and not ckpt else saved

    seqs = seq_lengths(mc)
    from gill.models.model import vae_scale_factor

    latent = res // vae_scale_factor(vae)
    acts: dict[str, ModeActivation] = {}
    # every mode has one next-token CE over the caption's tokens + one (the caption's end, or [IMG0])
    head, head_big = trace_lm_head(te, b * (int(mc.caption_max_tokens) + 1), dtype)
    if "captioning" in modes:
        s, big = trace_chatglm(te, b, seqs["captioning"], dtype, ck_te)
        s = kept(s, ck_te)
        acts["captioning"] = ModeActivation(s + head, int(TRANSIENT_FACTOR * max(big, head_big)),
                                            {"chatglm": s, "lm_head": head})
    img = None
    if "retrieval" in modes or "generation" in modes:
        s, big = trace_chatglm(te, b, seqs["img"], dtype, ck_te)
        img = (kept(s, ck_te) + head, max(big, head_big))
    if "retrieval" in modes:
        acts["retrieval"] = ModeActivation(img[0], int(TRANSIENT_FACTOR * img[1]), {"chatglm": img[0] - head,
                                                                                     "lm_head": head})
    if "generation" in modes:
        su, bigu = trace_unet(unet, adapter, b, latent, int(mc.adapter.spatial.max_objects), int(mc.prompt_max_length),
                              dtype, ck_unet)
        su = kept(su, ck_unet)
        saved = img[0] + su
        backward = int(TRANSIENT_FACTOR * max(bigu, img[1]))
        # no-grad peaks before the UNet runs: ChatGLM's prompt encoding keeps every layer's hidden
        # states (output_hidden_states); the VAE encoder's full-resolution maps (raw images only)
        prompt = (te.config.num_layers + 1) * b * int(mc.prompt_max_length) * te.config.hidden_size * esize
        # gill.models.model.vae_posterior encodes one image at a time: the peak does not grow with the micro-batch
        vae_enc = 0 if cached else VAE_ENCODE_MAPS * vae.config.block_out_channels[0] * res * res * esize
        acts["generation"] = ModeActivation(saved, max(backward, prompt, vae_enc - saved),
                                            {"chatglm": img[0] - head, "lm_head": head, "unet": su,
                                             "vae_encode": vae_enc, "prompt": prompt})
    return acts


def main(argv: list[str] | None = None) -> Plan | dict | None:
    ap = argparse.ArgumentParser(description="Predict the per-GPU memory peak of a training step.")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--card-gib", type=float, default=24.0)
    ap.add_argument("--cached", action="store_true", help="VAE latents / CLIP features precomputed offline")
    ap.add_argument("--optimizer", default="deepspeed", choices=["deepspeed", "torch"])
    ap.add_argument("--fit", action="store_true",
                    help="pick the micro-batch and gradient checkpointing for the card instead of planning one config")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train_ds.py")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=list(args.overrides))
    cached = args.cached or bool(cfg.get("cache", {}).get("dir"))  # the encoder cache (python -m gill.tools.build_encoder_cache)
    if args.fit:
        pick, rows = fit(cfg, args.world_size, args.card_gib, cached, args.optimizer)
        print(f"| checkpointing (UNet, ChatGLM) | largest micro-batch on a {args.card_gib:g} GiB card | device peak GiB |")
        print("|---|---:|---:|")
        for r in rows:
            print(f"| {r['ckpt_unet']}, {r['ckpt_text_encoder']} | {r['micro_batch'] or 'none'} | {r['device_peak_gib'] or '-'} |")
        print("\npick: " + (" ".join(fit_overrides(pick)) if pick else "nothing fits (not even micro-batch 1)"))
        return pick
    p = plan(cfg, args.world_size, args.card_gib, cached, args.optimizer)
    print(p.table())
    return p


if __name__ == "__main__":
    main()
