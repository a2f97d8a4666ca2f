#!/usr/bin/env python
"""Training-step benchmark: memory and speed of one full three-mode optimizer step.

One process, one frozen stack (``kolors_random`` at real Kolors dimensions, bf16 on the GPU; ``--tiny``
runs the tiny stack on the CPU to test the script), and for each strategy a fresh adapter + optimizer:

==========  ==============================================================================================
``naive``    the seed's original code: the three losses summed, one backward, torch AdamW on the GPU
``A``        per-mode backward (forward -> backward -> graph freed, per mode), torch AdamW on the GPU
``A+B``      A + gradient checkpointing of UNet and ChatGLM (the seed's best plain-PyTorch recipe)
``A+B+C``    A+B with ZeRO-2 and the optimizer state on the CPU (DeepSpeed, ``zero2_offload``)
``default``  the project default recipe (``model=kolors_random deepspeed=zero2_offload``, as configured:
             the adapter trained as one flat tensor, ``train.flat_params``)
``default-pertensor``  default with ``train.flat_params=false`` (DeepSpeed sees ~600 adapter tensors)
``default-te-nockpt``  default without gradient checkpointing of ChatGLM (its sequences are short)
``default+cache``  default reading cached VAE latents / CLIP features (``python -m gill.tools.build_encoder_cache``): the frozen
             VAE and CLIP leave the GPU
``tuned``    default + the levers that measured well: cached VAE latents / CLIP features (the frozen
             VAE and CLIP leave the GPU), selective checkpointing (UNet only)
``tuned-z2``  tuned with ZeRO-2 keeping the optimizer state on the GPU (``deepspeed=zero2``)
``tuned-z2-teckpt``  tuned-z2 with ChatGLM checkpointed too (what ``python -m gill.tools.plan --fit`` picks for mb 6)
``tuned-torch``  tuned with a plain torch AdamW on the GPU instead of DeepSpeed
``fast-nockpt``  tuned-z2 without checkpointing (uncapped, large micro-batch: the MFU row)
``tuned-nockpt``   tuned without any checkpointing (for the uncapped, large-micro-batch rows)
``tuned+compile``  tuned + regional ``torch.compile`` (``model.compile``, :mod:`gill.training.compile`: ChatGLM layers,
             UNet resnets, the attention/feed-forward modules of the UNet's 70 transformer blocks)
``fast-compile``  fast-nockpt + the same regional compile (the MFU row)
``tuned-z2+compile``  tuned+compile with ZeRO-2 keeping the optimizer state on the GPU (the 24 GB recipe, cached)
``tuned-z2+compile-ro``  the same with the regions compiled in ``mode="reduce-overhead"`` (CUDA graphs)
``z2+compile``  tuned-z2+compile from images (no encoder cache)
``tuned-z2-teckpt+compile``  tuned-z2+compile with ChatGLM checkpointed too
``...-int8``  the same with ChatGLM's transformer linears in weight-only int8 (``model.quantize.text_encoder=int8``;
             the stack is quantized in place at the first such row, so they run after every bf16 row)
``<any>+es``  the variant with the allocator's expandable segments, for that row only
==========  ==============================================================================================

``--trainer-rows cap:res:recipe:mb:steps,...`` also runs the real trainer (``launch/train_1gpu.sh``, recipes in
``trainer_recipe``: a base and ``+lever``s) before the stack loads and adds its steady state (first ``--trainer-warmup`` steps left out)
as a row. Every row reports its timed steps (``--steps``, default 10) and the allocator's retries in them.

DeepSpeed rows run the trainer's own ``gill.training.recipe.optimizer_step``. With the optimizer offloaded
they use the DeepSpeed config's optimizer (``DeepSpeedCPUAdam``, what the recipe trains with; JIT-built
on first use, set ``TORCH_EXTENSIONS_DIR`` to keep the build); ``--client-adam`` swaps in torch AdamW.

Grid: emulated 24 GiB card (``torch.cuda.set_per_process_memory_fraction``) and uncapped; 1024² and
512²; micro-batch 1, 2, 4, ... until it does not fit (an OOM is a row, not a crash). Per row: peak
reserved memory, samples/s (one sample = all three modes), time per mode (forward+backward; the
naive row has forwards only plus one joint backward), and model-FLOP utilisation: FLOPs are counted
once per resolution with ``torch.utils.flop_counter`` on a no-checkpointing, cached-input step at
micro-batch 1 (recomputation and VAE/CLIP encoding are not model FLOPs) and scaled by micro-batch.

    python benchmarks/step_benchmark.py                 # on the GPU machine (writes the .md/.json)
    python benchmarks/step_benchmark.py --tiny          # CPU smoke test of every variant

Results are written after every row (``--out-dir``, default ``benchmarks/``), so a run cut short still
leaves its rows. Ratios are taken within one run only.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gill.tools.resources import GiB, cap_gpu_memory  # noqa: E402

PEAK_BF16_FLOPS = 790e12  # measured bf16 GEMM rate on this H200 (KINDS.md: 769-798 TFLOP/s)

VARIANTS = {
    "naive": dict(backward="summed", ckpt_unet=False, ckpt_te=False, engine="torch", cached=False),
    "A": dict(backward="per_mode", ckpt_unet=False, ckpt_te=False, engine="torch", cached=False),
    "A+B": dict(backward="per_mode", ckpt_unet=True, ckpt_te=True, engine="torch", cached=False),
    "A+B+C": dict(backward="per_mode", ckpt_unet=True, ckpt_te=True, engine="zero2_offload", cached=False,
                  flat=False),
    "default": dict(backward="per_mode", ckpt_unet=None, ckpt_te=None, engine="default", cached=False),
    "default-pertensor": dict(backward="per_mode", ckpt_unet=None, ckpt_te=None, engine="default", cached=False,
                              flat=False),
    "default-te-nockpt": dict(backward="per_mode", ckpt_unet=None, ckpt_te=False, engine="default", cached=False),
    "default+cache": dict(backward="per_mode", ckpt_unet=None, ckpt_te=None, engine="default", cached=True),
    "tuned": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2_offload", cached=True),
    "tuned-z2": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2", cached=True),
    "tuned-z2-teckpt": dict(backward="per_mode", ckpt_unet=True, ckpt_te=True, engine="zero2", cached=True),
    "tuned-torch": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="torch", cached=True),
    "fast-nockpt": dict(backward="per_mode", ckpt_unet=False, ckpt_te=False, engine="zero2", cached=True),
    "tuned-nockpt": dict(backward="per_mode", ckpt_unet=False, ckpt_te=False, engine="zero2_offload", cached=True),
    "fast-compile": dict(backward="per_mode", ckpt_unet=False, ckpt_te=False, engine="zero2", cached=True,
                         compile=True),
    "tuned+compile": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2_offload", cached=True,
                          compile=True),
    "tuned-z2+compile": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2", cached=True,
                             compile=True),
    "tuned-z2+compile-ro": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2", cached=True,
                                compile=True, compile_mode="reduce-overhead"),
    "tuned-z2-teckpt+compile": dict(backward="per_mode", ckpt_unet=True, ckpt_te=True, engine="zero2", cached=True,
                                    compile=True),
    # ChatGLM's transformer linears in weight-only int8 (model.quantize.text_encoder=int8): the stack is
    # quantized in place at the first such row, so these rows come after every bf16 row of a run.
    "tuned-z2+compile-int8": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2", cached=True,
                                  compile=True, quant="int8"),
    "tuned-z2-teckpt+compile-int8": dict(backward="per_mode", ckpt_unet=True, ckpt_te=True, engine="zero2",
                                         cached=True, compile=True, quant="int8"),
    "z2+compile": dict(backward="per_mode", ckpt_unet=True, ckpt_te=False, engine="zero2", cached=False,
                       compile=True),
}
# Any variant + "+es": the same with the allocator's expandable segments (PYTORCH_CUDA_ALLOC_CONF=
# expandable_segments:True), switched on for that row only.
ES_SUFFIX = "+es"


def variant_spec(name: str) -> dict:
    if name.endswith(ES_SUFFIX) and name[: -len(ES_SUFFIX)] in VARIANTS:
        return dict(VARIANTS[name[: -len(ES_SUFFIX)]], es=True)
    return VARIANTS[name]


@contextlib.contextmanager
def expandable_segments(on: bool, device):
    """The caching allocator's expandable segments for one row: new segments grow in place instead of
    a fresh cudaMalloc per size class, so a capped card fragments less (fewer free-and-retry rounds)."""
    if not on or device.type != "cuda":
        yield
        return
    torch.cuda.empty_cache()
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    try:
        yield
    finally:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")


# Rows that run the real trainer (launch/train_1gpu.sh -> DeepSpeed launcher -> train_ds.py) on one GPU,
# tabulated from its metrics.jsonl by benchmarks/scaling.py. Overrides come after the script's own.
TRAINER_BASES = {
    # launch/train_1gpu.sh as it stands (ZeRO-2, optimizer on the GPU; since 2026-12-03 ChatGLM in int8-g128-mlp, checkpointed)
    "launch": [],
    # the same with ChatGLM in bf16 and not checkpointed: the launch script's recipe before 2026-12-03 (`launch` then)
    "launch-bf16": ["model.quantize.text_encoder=null", "model.gradient_checkpointing.text_encoder=false"],
    # ChatGLM's transformer linears in weight-only int8 and checkpointed (`int8-g128-mlp`: the scheme that passes
    # the quality guard, benchmarks/NOTES.md; what the launch script runs since 2026-12-03)
    **{f"launch-{scheme}": [f"model.quantize.text_encoder={scheme}", "model.gradient_checkpointing.text_encoder=true"]
       for scheme in ("int8", "int8-g128-mlp")},
    # the previous one-GPU recipe: optimizer state on the CPU (DeepSpeedCPUAdam, a JIT build on first use)
    "offload": ["deepspeed=zero2_offload", "~deepspeed.overrides.optimizer"],
}
# Levers added to a base with `+name` (`launch+prompts+gcfreeze`): Hydra overrides, environment
TRAINER_LEVERS = {
    "es": ([], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    "gcfreeze": (["train.gc_freeze_after=1"], {}),  # full GC collections skip the compiled heap
    "prompts": (["cache.prompts=true"], {}),  # the encoder cache holds the caption encodings too
    "ca": (["model.compile_adapter=true"], {}),  # the spatial adapter's injections compiled too
    # the UNet transformer blocks compiled piecewise (attention, feed-forward, the injection) instead of whole
    "noblocks": (["model.compile_blocks=false"], {}),
    # no recomputation at all (for an uncapped GPU: memory buys speed)
    "nockpt": (["model.gradient_checkpointing.unet=false", "model.gradient_checkpointing.text_encoder=false"], {}),
}


def trainer_recipe(name: str) -> dict:
    """``base+lever+...`` -> ``{"overrides": [...], "env": {...}}`` (``TRAINER_BASES``, ``TRAINER_LEVERS``)."""
    base, *levers = name.split("+")
    if base not in TRAINER_BASES or any(lv not in TRAINER_LEVERS for lv in levers):
        raise ValueError(f"trainer recipe {name!r}: base one of {sorted(TRAINER_BASES)}, "
                         f"then +lever from {sorted(TRAINER_LEVERS)}")
    overrides, env = list(TRAINER_BASES[base]), {}
    for lv in levers:
        overrides += TRAINER_LEVERS[lv][0]
        env.update(TRAINER_LEVERS[lv][1])
    return dict(overrides=overrides, env=env)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# config, stack, batch
# ------------------------------------------------------------------------------------------------
def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose("config", overrides=list(overrides))


def make_batch(model_name: str, res: int, mb: int, cached: bool, device, dtype, llm_caption_repeat: int):
    from gill.data.collate import collate_layout
    from gill.data.synthetic import SyntheticLayoutDataset

    ds = SyntheticLayoutDataset(mb, resolution=res, seed=1, min_objects=3, max_objects=3)
    items = [ds[i] for i in range(mb)]
    for it in items:  # real captions run to caption_max_tokens (77); synthetic ones are short
        it["caption"] = "，".join([it["caption"]] * llm_caption_repeat)
    batch = collate_layout(items)
    if cached:
        g = torch.Generator().manual_seed(0)
        latent = res // (4 if model_name == "tiny" else 8)
        vdim = 32 if model_name == "tiny" else 768
        batch["latents"] = torch.randn(mb, 4, latent, latent, generator=g).to(device, dtype)
        batch["vision_features"] = torch.randn(mb, vdim, generator=g).to(device, dtype)
        del batch["images"]
    return batch


def set_checkpointing(model, unet: bool, te: bool):
    if unet:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    if te:
        model.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.text_encoder.gradient_checkpointing_disable()


@contextlib.contextmanager
def encoders_off_gpu(model, stack, cpu_copies: dict):
    """Cached features: the frozen VAE and CLIP are not needed on the GPU. They are taken out of the
    module tree (so DeepSpeed does not move them back) and parked on the CPU for the run."""
    for name in ("vae", "vision"):
        mod = model._modules.pop(name)
        cpu_copies[name] = mod.to("cpu")
        object.__setattr__(model, name, cpu_copies[name])
    try:
        yield
    finally:
        for name in ("vae", "vision"):
            object.__delattr__(model, name)
        # moved back to the GPU by restore_encoders(), after the caller freed this run's memory
        # (moving them inside an OOM's unwinding would OOM again)


def restore_encoders(stack):
    dev = stack.unet.device
    for name in ("vae", "vision"):
        getattr(stack, name).to(dev)


# ------------------------------------------------------------------------------------------------
# one strategy at one (resolution, micro-batch)
# ------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, start):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            e.synchronize()
            return start.elapsed_time(e)
        return (time.perf_counter() - start) * 1e3


def build_ds_engine(cfg, model, mb: int, n_modes: int, ds_name: str, device, client_adam: bool):
    import deepspeed

    from gill.training import distributed
    from gill.training.ds_config import build_ds_config

    distributed.init(device)
    cfg = cfg.copy()
    cfg.deepspeed.file = ds_name
    # build_ds_config refuses retrieval at one sample per step (no negatives); for the benchmark a
    # one-sample InfoNCE is fine (same compute), so fill with 2 and patch the batch numbers back.
    cfg.train.micro_batch_size = max(2, mb)
    ds = build_ds_config(cfg, 1, on_gpu=device.type == "cuda")
    ds["train_micro_batch_size_per_gpu"] = mb
    ds["train_batch_size"] = mb * n_modes
    ds["bf16"]["enabled"] = device.type == "cuda"
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    optimizer = None
    if client_adam or not offload:
        # On the GPU the config's AdamW would be DeepSpeed's FusedAdam (a CUDA JIT build); torch's
        # fused AdamW is the same maths. Offloaded, --client-adam skips DeepSpeedCPUAdam's C++ build.
        ds["zero_force_ds_cpu_optimizer"] = False
        ds.pop("optimizer", None)
        optimizer = lambda ps: torch.optim.AdamW(ps, lr=1e-5, foreach=True)  # noqa: E731
    ds.pop("scheduler", None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.trainable_parameters(), config=ds, optimizer=optimizer
    )
    model.adapter.refresh()
    return engine, offload


def write_profile(one_step, path: Path, device) -> None:
    """One more step under ``torch.profiler``: where the time goes, by CPU and by GPU time."""
    from gill.tools.profiling import make_profiler, profile_tables

    with make_profiler(device) as prof:
        one_step()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_tables(prof, device, f"profile of one step ({path.stem})"), encoding="utf-8")
    log(f"profile written to {path}")


def run_one(stack, cfg, variant: str, res: int, mb: int, args, device, dtype, profile_path: Path | None = None) -> dict:
    from gill.models.model import GillModel
    from gill.training.recipe import optimizer_step

    from gill.models.quantize import Int8Linear, frozen_bytes, quantize_text_encoder

    spec = variant_spec(variant)
    modes = ["captioning", "retrieval", "generation"]
    quantized = any(isinstance(m, Int8Linear) for m in stack.text_encoder.modules())
    if quantized and not spec.get("quant"):
        raise ValueError(f"{variant}: the stack was quantized by an earlier row; put bf16 rows first")
    quantize_text_encoder(stack.text_encoder, None if quantized else spec.get("quant"))
    ckpt_unet = cfg.model.gradient_checkpointing.unet if spec["ckpt_unet"] is None else spec["ckpt_unet"]
    ckpt_te = cfg.model.gradient_checkpointing.text_encoder if spec["ckpt_te"] is None else spec["ckpt_te"]
    engine_kind = spec["engine"]
    ds_file = cfg.deepspeed.file if engine_kind == "default" else f"{engine_kind}.json"
    cfg = cfg.copy()
    # The default rows compile as configured (model.compile); the others as their spec says.
    cfg.model.compile = cfg.model.get("compile", False) if engine_kind == "default" else bool(spec.get("compile"))
    torch.manual_seed(0)
    import gill.training.compile

    gill.training.compile.MODE = spec.get("compile_mode")
    model = GillModel(stack, cfg.model)
    gill.training.compile.MODE = None
    compiled = model.compiled_regions
    set_checkpointing(model, ckpt_unet, ckpt_te)
    cpu_copies: dict = {}
    ctx = encoders_off_gpu(model, stack, cpu_copies) if spec["cached"] else contextlib.nullcontext()
    engine = opt = None
    flat = engine_kind != "torch" and spec.get("flat", bool(cfg.train.flat_params))
    row = dict(variant=variant, res=res, mb=mb, ckpt_unet=bool(ckpt_unet), ckpt_te=bool(ckpt_te),
               engine=engine_kind if engine_kind != "default" else f"default({ds_file})", cached=spec["cached"],
               flat=flat, compile=bool(cfg.model.compile), expandable=bool(spec.get("es")),
               text_encoder=spec.get("quant") or "bf16", text_encoder_gib=frozen_bytes(stack.text_encoder) / GiB)
    try:
        with expandable_segments(bool(spec.get("es")), device), ctx:
            model.adapter.to(device, dtype)
            model.train()
            batch = make_batch(cfg.model.name, res, mb, spec["cached"], device, dtype, args.caption_repeat)
            if engine_kind == "torch":
                opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, foreach=True)
                fwd = model
            else:
                if flat:
                    model.adapter.flatten()
                engine, _ = build_ds_engine(cfg, model, mb, len(modes), ds_file, device, args.client_adam)
                row["optimizer"] = type(engine.optimizer.optimizer).__name__
                fwd = engine
            timer = Timer(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            steps, per_mode, mode_peak = [], {m: [] for m in modes}, {m: 0 for m in modes}
            mark = {"reserved": 0}

            def begin_mode():
                if device.type == "cuda":
                    mark["reserved"] = max(mark["reserved"], torch.cuda.max_memory_reserved())
                    mark["base"] = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                mark["t"] = timer.start()

            def end_mode(m):
                per_mode.setdefault(m, []).append(timer.ms(mark["t"]))
                if device.type == "cuda":
                    mode_peak[m] = max(mode_peak.get(m, 0), torch.cuda.max_memory_allocated() - mark["base"])
                begin_mode()

            def one_step():
                begin_mode()
                if spec["backward"] == "summed":
                    total = 0.0
                    for m in modes:
                        total = total + fwd(batch, m)["loss"]
                        end_mode(m)
                    total.backward()
                    end_mode("joint_backward")
                    del total
                elif engine is not None:  # exactly what the trainer runs
                    optimizer_step(engine, [batch], modes, {}, after_micro_step=end_mode)
                else:
                    for m in modes:
                        fwd(batch, m)["loss"].backward()
                        end_mode(m)
                if engine is None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    end_mode("optimizer")
                if device.type == "cuda":
                    torch.cuda.synchronize()

            retries = {}
            for i in range(args.warmup + args.steps):
                if i == args.warmup and device.type == "cuda":
                    retries["start"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
                t0 = time.perf_counter()
                one_step()
                steps.append(time.perf_counter() - t0)
            timed = steps[args.warmup:]
            dt = statistics.median(timed)
            if device.type == "cuda":
                # free-everything-and-retry rounds of the caching allocator (each a device sync + cudaFree)
                row["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries["start"]
            row["steps_timed"] = len(timed)
            row["samples_per_s_mean"] = mb * len(timed) / sum(timed)
            row.update(
                status="ok",
                step_s=dt,
                samples_per_s=mb / dt,
                ms_per_mode={k: round(statistics.median(v[args.warmup:] or v), 2) for k, v in per_mode.items() if v},
                first_step_s=steps[0],
            )
            if device.type == "cuda":
                row["peak_reserved_gib"] = max(mark["reserved"], torch.cuda.max_memory_reserved()) / GiB
                row["mode_act_peak_gib"] = {m: round(v / GiB, 3) for m, v in mode_peak.items()}
            if profile_path is not None:
                write_profile(one_step, profile_path, device)
    finally:
        model.adapter.spatial.detach()
        for m in compiled:
            del m.forward  # back to the class's eager forward
        if engine is not None and hasattr(engine, "destroy"):
            with contextlib.suppress(Exception):
                engine.destroy()
    return row


def measure_row(stack, cfg, variant, res, mb, cap, args, device, dtype, meta) -> dict:
    """One row under an emulated card of ``cap`` GiB (0: uncapped); never raises."""
    cap_gpu_memory(device, cap)
    t0 = time.perf_counter()
    try:
        spec = f"{cap:g}:{res}:{variant}:{mb}"
        wanted = spec in args.profile.split(",")
        safe = variant.replace("+", "_")  # the device's file transfer refuses "+" in names
        profile_path = Path(args.also_out or args.out_dir) / f"profile_{safe}_{res}_mb{mb}.txt" if wanted else None
        row = run_one(stack, cfg, variant, res, mb, args, device, dtype, profile_path)
    except Exception as e:  # noqa: BLE001 - an OOM (or a failure) is a row
        vs = variant_spec(variant)
        row = dict(variant=variant, res=res, mb=mb, cached=vs["cached"], ckpt_unet=vs["ckpt_unet"], ckpt_te=vs["ckpt_te"],
                   status="OOM" if is_oom(e) else f"error: {type(e).__name__}", error=str(e)[:500])
        if device.type == "cuda":
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        del e
    row["cap_gib"] = cap or None
    if row["status"] == "ok":
        fl = meta["flops"].get(str(res))
        row["mfu"] = fl * row["samples_per_s"] / PEAK_BF16_FLOPS if fl else None
    row["wall_s"] = time.perf_counter() - t0
    cleanup(device)
    restore_encoders(stack)
    log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "error"}),
        row.get("error", "")[:200])
    return row


def launch_script_args(*extra: str, script: str = "train_1gpu.sh") -> list[str]:
    """The arguments ``launch/<script> *extra`` hands to `deepspeed` (a stub on PATH records them)."""
    import shlex
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stub, record = Path(tmp) / "deepspeed", Path(tmp) / "args.txt"
        stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
        stub.chmod(0o755)
        env = dict(os.environ, PATH=f"{tmp}:{os.environ['PATH']}")
        subprocess.run(["bash", str(ROOT / "launch" / script), *extra], check=True, env=env, timeout=60)
        return record.read_text().splitlines()


def trainer_cache(root: str, res: str, overrides: list[str]) -> Path:
    """The encoder cache of the trainer rows' data (seeded ``kolors_random``, the default synthetic set),
    built on first use by ``python -m gill.tools.build_encoder_cache``. When the row trains with
    ``cache.prompts=true`` (the launch script's choice with a cache, unless the row's ``overrides`` say otherwise)
    it holds the prompt encodings, under the ChatGLM quantization the row trains with (a cache of its own)."""
    args = launch_script_args(f"cache.dir={root}", *overrides)  # what the row's run will be handed

    def last(key: str) -> str | None:
        values = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
        return values[-1] if values else None

    extra = []
    if last("cache.prompts") == "true":
        extra = ["cache.prompts=true", f"model.quantize.text_encoder={last('model.quantize.text_encoder')}"]
    name = [f"kolors_random_{res}", *(["prompts", extra[-1].split("=")[-1]] if extra else [])]
    path = Path(root) / "_".join(name)
    if not (path / "manifest.json").exists():
        cmd = [sys.executable, "-m", "gill.tools.build_encoder_cache", "model=kolors_random",
               f"train.resolution={res}", f"cache.dir={path}", *extra]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
    return path


def trainer_row(spec: str, args, out_dir: Path) -> dict:
    """``cap:res:recipe:mb:steps``: the real trainer on one GPU, steady state after ``--trainer-warmup`` steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    cap, res, recipe, mb, steps = spec.split(":")
    rec = trainer_recipe(recipe)
    run_dir = out_dir / "trainer" / f"{recipe.replace('+', '_')}_{res}_mb{mb}_cap{cap}_{time.strftime('%H%M%S')}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = [f"cache.dir={trainer_cache(args.trainer_cache, res, rec['overrides'])}"] if args.trainer_cache else []
    overrides = ["model=kolors_random", f"train.resolution={res}", f"train.micro_batch_size={mb}",
                 "train.grad_accum=1", *cache, *rec["overrides"], *args.trainer_overrides]
    saved = {k: os.environ.get(k) for k in rec["env"]}
    os.environ.update(rec["env"])
    try:
        rc, wall = scaling.launch(1, int(steps), args.trainer_minutes, float(cap), run_dir, overrides,
                                  script="train_1gpu.sh")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    handed = launch_script_args(*overrides)
    resolved = compose(handed[handed.index("train_ds.py") + 1:])  # what the run trained with, for the table's columns
    row = dict(variant=f"trainer:{recipe}", res=int(res), mb=int(mb), cap_gib=float(cap) or None, wall_s=wall,
               command="launch/train_1gpu.sh " + " ".join(overrides), env=rec["env"], cached=bool(cache),
               ckpt_unet=bool(resolved.model.gradient_checkpointing.unet),
               ckpt_te=bool(resolved.model.gradient_checkpointing.text_encoder),
               flat=bool(resolved.train.flat_params), compile=bool(resolved.model.compile))
    metrics = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        tail = Path(f"{run_dir}.log").read_text(errors="replace")[-600:] if Path(f"{run_dir}.log").exists() else ""
        return dict(row, status="OOM" if "out of memory" in tail.lower() else f"error: exit {rc}", error=tail)
    sm = scaling.summarize(metrics, 1, args.trainer_warmup)
    return dict(row, status="ok", samples_per_s=sm["samples_per_s"], step_s=sm["step_s_median"],
                steps_timed=sm["steady_steps"], peak_reserved_gib=sm["gpu_reserved_peak_gib"][0],
                peak_alloc_gib=sm["gpu_peak_gib"][0], ms_per_mode={}, losses=sm["losses_first_last"])


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class FlopCount(__import__("torch.utils._python_dispatch", fromlist=["x"]).TorchDispatchMode):
    """``torch.utils.flop_counter``'s per-op formulas without FlopCounterMode's module tracker (whose
    backward hooks assert on ChatGLM's inputs in torch 2.11: "Expected gradient function to be set")."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        f = self.registry.get(func._overloadpacket)
        if f is not None:
            self.total += f(*args, **kwargs, out_val=out)
        return out


def count_flops(stack, cfg, res: int, args, device, dtype) -> float:
    """Model FLOPs of one three-mode step per sample (forward + backward, no recompute, cached inputs)."""
    from gill.models.model import GillModel

    torch.manual_seed(0)
    model = GillModel(stack, cfg.model)
    set_checkpointing(model, False, False)
    try:
        model.adapter.to(device, dtype)
        model.train()
        batch = make_batch(cfg.model.name, res, 1, True, device, dtype, args.caption_repeat)
        for m in ("captioning", "retrieval", "generation"):  # warm the phrase cache outside the count
            model(batch, m)["loss"].backward()
        model.zero_grad(set_to_none=True)
        with FlopCount() as fc:
            for m in ("captioning", "retrieval", "generation"):
                model(batch, m)["loss"].backward()
        return float(fc.total)
    finally:
        model.adapter.spatial.detach()


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def fmt_table(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Training-step benchmark",
        "",
        f"Produced by `{meta['command']}` on {meta['device']} ({meta['when']}); torch {meta['torch']}. "
        f"Stack: `{meta['model']}` in {meta['dtype']}, frozen weights {meta.get('static_gib', 0):.2f} GiB on the GPU. "
        f"One sample = captioning + retrieval + generation. MFU = counted model FLOPs "
        f"({', '.join(f'{k}²: {v / 1e12:.2f} TFLOP/sample' for k, v in meta.get('flops', {}).items())}) "
        f"x samples/s / {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s. Peak = `torch.cuda.max_memory_reserved()` for the "
        "whole process (frozen stack included, CUDA context not). Times: medians over the timed steps.",
        "",
        *([f"Merged runs: {meta['runs']}", ""] if meta.get("runs") else []),
        *([f"Notes: {meta['notes']}", ""] if meta.get("notes") else []),
        "Columns: ckpt U/T = gradient checkpointing of UNet / ChatGLM; cached = VAE latents and CLIP features "
        "precomputed (the encoder cache); flat = adapter trained as one tensor (DeepSpeed rows); compiled = "
        "regional torch.compile.",
        "",
        "| run | cap | res | strategy | mb | ckpt U/T | cached | flat | compiled | status | peak reserved GiB | samples/s | "
        "ms per mode (cap / ret / gen / other) | MFU | timed steps | alloc retries |",
        "|---|---|---:|---|---:|---|---|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        cap = f"{r['cap_gib']} GiB" if r.get("cap_gib") else "none"
        ck = f"{'Y' if r.get('ckpt_unet') else 'N'}/{'Y' if r.get('ckpt_te') else 'N'}"
        flat = {True: "Y", False: "N", None: "-"}[r.get("flat")]
        comp = "Y" if r.get("compile", "compile" in r["variant"]) else "N"
        ck = f"{ck} | {'Y' if r.get('cached') else 'N'} | {flat} | {comp}"
        if r["variant"].startswith("trainer:") and "ckpt_unet" not in r:  # recorded before the columns were
            ck = "- | - | - | -"
        extra = f" | {r.get('steps_timed', '-')} | {r.get('alloc_retries', '-')} |"
        if r.get("status") == "ok":
            mp = r["ms_per_mode"]
            other = mp.get("joint_backward", mp.get("optimizer"))
            ms = " / ".join(f"{mp.get(k, 0):.0f}" for k in ("captioning", "retrieval", "generation"))
            ms += f" / {other:.0f}" if other is not None else " / -"
            if not mp:  # trainer rows: the step's median instead
                ms = f"step {1e3 * r['step_s']:.0f} ms"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {r.get('run', 1)} | {cap} | {r['res']} | {r['variant']} | {r['mb']} | {ck} | ok | "
                         f"{r.get('peak_reserved_gib', float('nan')):.2f} | {r['samples_per_s']:.3f} | {ms} | {mfu}"
                         + extra)
        else:
            pk = r.get("peak_reserved_gib")
            pk = f"{pk:.2f}" if pk is not None else "-"
            lines.append(f"| {r.get('run', 1)} | {cap} | {r['res']} | {r['variant']} | {r['mb']} | {ck} | "
                         f"{r['status']} | {pk} | - | - | -" + extra)
    return "\n".join(lines) + "\n"


def write(rows, meta, out_dir: Path, also: Path | None):
    for d in filter(None, (out_dir, also)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "step_benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (d / "step_benchmark.md").write_text(fmt_table(rows, meta))


# ------------------------------------------------------------------------------------------------
def merge(paths: list[str], out_dir: Path, notes: str = "", first_run: int = 1) -> None:
    """Several runs' JSON -> one table (rows keep their run number; ratios only within a run).
    Model FLOPs are a property of the model and shapes, so a count from any run applies to all."""
    metas, rows = [], []
    for i, path in enumerate(paths, first_run):
        data = json.loads(Path(path).read_text())
        metas.append(data["meta"])
        rows += [dict(r, run=i) for r in data["rows"]]
    flops = {k: v for m in metas for k, v in m.get("flops", {}).items()}
    for r in rows:
        if r["status"] == "ok" and flops.get(str(r["res"])):
            r["mfu"] = flops[str(r["res"])] * r["samples_per_s"] / PEAK_BF16_FLOPS
    meta = dict(metas[-1], flops=flops, notes=notes,
                runs="; ".join(f"run {i}: `{m['command']}` ({m['when']})" for i, m in enumerate(metas, first_run)))
    meta["command"] = "python benchmarks/step_benchmark.py --merge " + " ".join(Path(p).name for p in paths)
    write(rows, meta, out_dir, None)


def run_meta(argv, device_type: str, model: str, dtype, **extra) -> dict:
    """The run's header: command, device, date, torch, stack."""
    cuda = device_type == "cuda"
    return dict(command="python benchmarks/step_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
                device=torch.cuda.get_device_name() if cuda else "CPU", when=time.strftime("%Y-%m-%d %H:%M"),
                torch=torch.__version__, model=model, dtype=str(dtype),
                total_gib=(torch.cuda.get_device_properties(0).total_memory / GiB) if cuda else None, **extra)


def add_trainer_mfu(rows: list[dict], meta: dict) -> None:
    for r in rows:
        fl = meta["flops"].get(str(r["res"]))
        if r["status"] == "ok" and fl:
            r["mfu"] = fl * r["samples_per_s"] / PEAK_BF16_FLOPS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny stack on the CPU (tests the script)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--resolutions", default="1024,512")
    ap.add_argument("--caps", default="24,0", help="emulated card sizes in GiB; 0 = uncapped")
    ap.add_argument("--max-mb", type=int, default=8)
    ap.add_argument("--capped-max-mb", type=int, default=4)
    ap.add_argument("--compile-res", default="1024", help="tuned+compile: resolutions to run it at")
    ap.add_argument("--compile-max-mb", type=int, default=1, help="tuned+compile: largest micro-batch (each recompiles)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (after --warmup)")
    ap.add_argument("--caption-repeat", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new row after this many seconds of rows (stack build and FLOP count not included)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    ap.add_argument("--also-out", default=os.environ.get("OUT", ""), help="second copy of the results ($OUT)")
    ap.add_argument("--rows", default="", help="explicit rows cap:res:variant:mb,... instead of the grid")
    ap.add_argument("--trainer-rows", default="",
                    help="cap:res:recipe:mb:steps,... - rows that run the real trainer (recipe: a base of "
                    + ", ".join(TRAINER_BASES) + " then +levers of " + ", ".join(TRAINER_LEVERS)
                    + "); run first, before this process loads its stack")
    ap.add_argument("--trainer-warmup", type=int, default=10, help="trainer rows: first steps left out")
    ap.add_argument("--trainer-minutes", type=float, default=6.0, help="trainer rows: time limit of each run")
    ap.add_argument("--trainer-cache", default=None, help="trainer rows: train from an encoder cache under this "
                    "folder (built on first use; model=kolors_random with its default seed)")
    ap.add_argument("--trainer-only", type=float, default=None, metavar="TFLOP_PER_SAMPLE",
                    help="run only the trainer rows; their MFU from this FLOP count (printed by an earlier run)")
    ap.add_argument("--trainer-overrides", nargs="*", default=[], help="trainer rows: extra Hydra overrides")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the composed config")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result JSONs into --out-dir")
    ap.add_argument("--notes", default="")
    ap.add_argument("--first-run", type=int, default=1, help="--merge: number of the first run")
    ap.add_argument("--client-adam", action="store_true", help="torch AdamW instead of DeepSpeedCPUAdam when offloaded")
    ap.add_argument("--profile", default="", help="cap:res:variant:mb,... - also write a torch.profiler table of these rows")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out_dir), args.notes, args.first_run)
    t_start = time.perf_counter()
    out_dir, also = Path(args.out_dir), (Path(args.also_out) if args.also_out else None)
    trainer_rows = [trainer_row(spec, args, also or out_dir) for spec in filter(None, args.trainer_rows.split(","))]
    for r in trainer_rows:
        log(json.dumps({k: v for k, v in r.items() if k != "error"}), r.get("error", "")[-300:])
    if args.trainer_only is not None:
        meta = run_meta(argv, "cuda" if torch.cuda.is_available() else "cpu", "kolors_random", torch.bfloat16,
                        flops={str(r["res"]): args.trainer_only * 1e12 for r in trainer_rows})
        add_trainer_mfu(trainer_rows, meta)
        write(trainer_rows, meta, out_dir, also)
        log(fmt_table(trainer_rows, meta))
        return trainer_rows

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    model_name = "tiny" if args.tiny else "kolors_random"
    cfg = compose([f"model={model_name}", *args.overrides])
    from gill.models.stack import load_stack

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    stack = load_stack(cfg.model, device=device, dtype=dtype)
    static = torch.cuda.memory_allocated() / GiB if device.type == "cuda" else 0.0
    meta = run_meta(argv, device.type, model_name, dtype, flops={}, static_gib=static,
                    stack_build_s=time.perf_counter() - t_start)
    log(f"stack built in {meta['stack_build_s']:.1f}s, {static:.2f} GiB on {device}")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if args.tiny:
        resolutions = [64]
    rows: list[dict] = []

    for res in resolutions:  # FLOPs first, uncapped
        try:
            meta["flops"][str(res)] = count_flops(stack, cfg, res, args, device, dtype)
            log(f"flops {res}: {meta['flops'][str(res)] / 1e12:.3f} TFLOP per sample")
        except Exception as e:  # noqa: BLE001
            log(f"flop count {res} failed: {type(e).__name__}: {str(e)[:300]}")
        cleanup(device)
    add_trainer_mfu(trainer_rows, meta)
    rows.extend(trainer_rows)
    write(rows, meta, out_dir, also)

    t_rows = time.perf_counter()
    if args.rows:
        for spec in args.rows.split(","):
            cap, res, variant, mb = spec.split(":")
            if time.perf_counter() - t_rows > args.budget_s:
                log(f"skip {spec}: past the time budget")
                continue
            rows.append(measure_row(stack, cfg, variant, int(res), int(mb), float(cap), args, device, dtype, meta))
            write(rows, meta, out_dir, also)
        meta["total_s"] = time.perf_counter() - t_start
        write(rows, meta, out_dir, also)
        log(fmt_table(rows, meta))
        return rows
    variants = args.variants.split(",")
    for cap in [float(c) for c in args.caps.split(",")]:
        for res in resolutions:
            for variant in variants:
                mb = 1
                max_mb = args.capped_max_mb if cap else args.max_mb
                if VARIANTS[variant].get("compile"):
                    max_mb = min(max_mb, args.compile_max_mb)
                    if str(res) not in args.compile_res.split(",") and not args.tiny:
                        continue
                while mb <= max_mb:
                    if time.perf_counter() - t_rows > args.budget_s:
                        log(f"skip {variant} {res} mb{mb} cap{cap}: past the time budget")
                        break
                    row = measure_row(stack, cfg, variant, res, mb, cap, args, device, dtype, meta)
                    rows.append(row)
                    write(rows, meta, out_dir, also)
                    if row["status"] != "ok":
                        break
                    mb *= 2
    meta["total_s"] = time.perf_counter() - t_start
    write(rows, meta, out_dir, also)
    log(fmt_table(rows, meta))
    return rows


if __name__ == "__main__":
    main()
