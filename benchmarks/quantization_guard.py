"""Quality guard for frozen weights in less memory: every mode's loss and the adapter's gradient on
one fixed batch, the frozen stack as loaded vs. the same weights quantized (``gill.models.quantize``).

    python benchmarks/quantization_guard.py [--scheme int8] [--mb 2] [--res 1024] [--reference fp32] [model=kolors_random]

Pass: each mode's loss within ``--loss-tol`` (1%) of the unquantized one, and the flattened adapter
gradient of each mode with cosine similarity >= ``--min-cos`` (0.99). Same weights, same batch, same
random draws (the model's generator is reseeded before each mode); only the text encoder's linears
change between the two passes. Prints a table, writes JSON with ``--out``, exits 1 on a failed guard.
On a CPU the stack runs in fp32 (``--dtype bf16``: as on a GPU) and the default model is ``tiny``; Kolors'
dimensions fit a 24 GiB host in bf16 (``--dtype bf16 --res 256 model=kolors_random``, ~20 min on one thread).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = ("captioning", "retrieval", "generation")


def mode_losses_and_grads(model, batch, seed: int = 0) -> dict[str, tuple[float, torch.Tensor]]:
    """Per mode: (loss, flattened fp32 adapter gradient), each from a fresh backward."""
    params = model.trainable_parameters()
    out = {}
    for mode in MODES:
        for p in params:
            p.grad = None
        model.seed(seed)
        loss = model(batch, mode)["loss"]
        loss.backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
        out[mode] = (loss.item(), grad)
    for p in params:
        p.grad = None
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.norm() > 0 else float("nan")


def guard(cfg, scheme: str, mb: int, res: int, device, dtype, loss_tol: float = 0.01, min_cos: float = 0.99,
          reference: torch.dtype | None = None, cached: bool = True) -> dict:
    """Losses and adapter gradients as loaded (`dtype`) vs. quantized. With `reference` (fp32), the stack
    is loaded in that dtype first and cast to `dtype` after a reference pass: how far `dtype` itself
    moves the numbers, the yardstick for the quantization's distance (same weights, rounded)."""
    from step_benchmark import make_batch

    from gill.models.model import GillModel
    from gill.models.quantize import frozen_bytes, quantize_text_encoder
    from gill.models.stack import load_stack

    t0 = time.perf_counter()
    stack = load_stack(cfg.model, device=device, dtype=reference or dtype)
    torch.manual_seed(0)
    model = GillModel(stack, cfg.model)
    model.train()
    passes = {}
    for name, run_dtype in ([("reference", reference)] if reference else []) + [("loaded", dtype)]:
        model.to(device, run_dtype)
        batch = make_batch(cfg.model.name, res, mb, cached=cached, device=device, dtype=run_dtype,
                           llm_caption_repeat=1)
        passes[name] = mode_losses_and_grads(model, batch)
    before_bytes = frozen_bytes(stack.text_encoder)
    n = quantize_text_encoder(stack.text_encoder, scheme)
    model.clear_text_caches()  # the label and empty-prompt encodings come from the quantized encoder now
    passes["quantized"] = mode_losses_and_grads(model, batch)
    rows = []
    for mode in MODES:
        (l0, g0), (l1, g1) = passes["loaded"][mode], passes["quantized"][mode]
        rel = abs(l1 - l0) / max(abs(l0), 1e-12)
        row = dict(mode=mode, loss_ref=l0, loss_quant=l1, loss_rel_diff=rel, grad_cosine=_cosine(g0, g1))
        row["ok"] = rel <= loss_tol and row["grad_cosine"] >= min_cos
        if reference:
            lr, gr = passes["reference"][mode]
            row.update(loss_reference=lr, cos_loaded_vs_reference=_cosine(gr, g0),
                       cos_quant_vs_reference=_cosine(gr, g1))
        rows.append(row)
    return dict(model=cfg.model.name, scheme=scheme, mb=mb, res=res, dtype=str(dtype), cached=cached,
                reference=str(reference) if reference else None, linears=n,
                text_encoder_mib_before=before_bytes / 2**20, text_encoder_mib_after=frozen_bytes(stack.text_encoder) / 2**20,
                loss_tol=loss_tol, min_cos=min_cos, rows=rows, ok=all(r["ok"] for r in rows),
                seconds=time.perf_counter() - t0)


def fmt(result: dict) -> str:
    ref = result["reference"]
    lines = [f"{result['model']}, text encoder {result['scheme']} ({result['linears']} linears): "
             f"{result['text_encoder_mib_before']:.1f} -> {result['text_encoder_mib_after']:.1f} MiB, "
             f"mb {result['mb']}, {result['res']} px, {result['dtype']}, {result['seconds']:.0f} s",
             "| mode | loss (as loaded) | loss (quantized) | rel. diff | adapter grad cosine | ok |"
             + (f" loss ({ref}) | cosine as loaded vs {ref} | cosine quantized vs {ref} |" if ref else ""),
             "|---|---:|---:|---:|---:|---|" + ("---:|---:|---:|" if ref else "")]
    for r in result["rows"]:
        line = (f"| {r['mode']} | {r['loss_ref']:.5f} | {r['loss_quant']:.5f} | {r['loss_rel_diff']:.2%} | "
                f"{r['grad_cosine']:.5f} | {'yes' if r['ok'] else 'NO'} |")
        if ref:
            line += f" {r['loss_reference']:.5f} | {r['cos_loaded_vs_reference']:.5f} | {r['cos_quant_vs_reference']:.5f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    from hydra import compose, initialize_config_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--res", type=int, default=None, help="image side (default: the model's resolution)")
    ap.add_argument("--loss-tol", type=float, default=0.01)
    ap.add_argument("--min-cos", type=float, default=0.99)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="the stack's dtype as loaded (default: bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--reference", choices=["fp32"], default=None,
                    help="also load in fp32 first: how far bf16 itself moves the losses and gradients")
    ap.add_argument("--images", action="store_true", help="raw images through the VAE/CLIP (default: cached-style "
                    "random latents and CLIP features, as the 24 GB recipe trains)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default model: kolors_random on a GPU, tiny on a CPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    overrides = list(args.overrides)
    if not any(o.startswith("model=") for o in overrides):
        overrides.insert(0, "model=" + ("kolors_random" if device.type == "cuda" else "tiny"))
    if not any(o.startswith("model.compile=") for o in overrides):
        overrides.append("model.compile=false")  # numbers, not speed: compiling each precision takes minutes
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    res = args.res or int(cfg.model.resolution)
    result = guard(cfg, args.scheme, args.mb, res, device, dtype, args.loss_tol, args.min_cos,
                   torch.float32 if args.reference else None, cached=not args.images)
    print(fmt(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
