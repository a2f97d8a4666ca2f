"""Annotation throughput at Qwen2-VL-7B dimensions with random weights (the DESIGN §8 measurement).

Runs the pipeline's own worker (:class:`gill.annotate.worker.AnnotateWorker`: build inputs with left padding,
batched greedy ``generate``, decode, parse, filter) on pre-decoded 448² images, with exactly
``--new-tokens`` generated tokens per image (``min_new_tokens == max_new_tokens``, so EOS cannot end early),
for batch 1 and larger batches, with the dynamic (eager) KV cache and, if time allows, the static cache whose
decode step transformers compiles. Writes a markdown table (``--out``) and JSON results (``--json``).

GPU:  python benchmarks/annotate_throughput.py --dims 7b --batches 1,64,256,512 --out benchmarks/annotate_throughput.md
CPU smoke test:  python benchmarks/annotate_throughput.py --dims tiny --batches 1,4 --new-tokens 8 --image-size 56
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

# Qwen2-VL-7B-Instruct's config.json
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)


def build(dims: str, device: str, attn: str):
    from transformers import Qwen2VLForConditionalGeneration

    from gill.annotate.tiny_qwen import build_image_processor, build_tokenizer, save_processor_files, tiny_config

    tok = build_tokenizer()
    if dims == "7b":
        config = tiny_config(tok, vision_overrides=VISION_7B, **TEXT_7B)
    else:
        config = tiny_config(tok)
    config._attn_implementation = attn
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
    proc_dir = Path(tempfile.mkdtemp()) / f"qwen2vl-{dims}-random"
    proc_dir.mkdir(parents=True)
    save_processor_files(proc_dir, tok, build_image_processor(56 * 56, 448 * 448))
    return model, proc_dir


def worker_cfg(proc_dir, args, cache):
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "annotate.yaml").read_text())
    cfg["backend"].update(model_path=str(proc_dir), model_name=f"Qwen2-VL-{args.dims}-random",
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          cache_implementation=cache, max_pixels=args.image_size ** 2)
    return cfg


def batch_of(n, size, rng):
    px = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return {"id": [f"b{i}" for i in range(n)], "image": [f"{i}.jpg" for i in range(n)],
            "caption": ["一只橘猫趴在沙发上"] * n, "error": [""] * n, "width": [size] * n, "height": [size] * n,
            "pixels": px}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--batches", default="1,64,256,512")
    ap.add_argument("--static-batches", default="", help="batch sizes also run with the static (compiled) cache")
    ap.add_argument("--batch1-images", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no new config after this many seconds")
    ap.add_argument("--profile", action="store_true", help="cProfile a short generate at the 2nd batch size")
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    t_start = time.perf_counter()
    from gill.annotate.worker import AnnotateWorker

    model, proc_dir = build(args.dims, args.device, args.attn)
    print(f"model built in {time.perf_counter() - t_start:.1f}s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params", flush=True)
    rng = np.random.default_rng(0)
    results = []
    runs = [("dynamic", int(b)) for b in args.batches.split(",") if b]
    runs += [("static", int(b)) for b in args.static_batches.split(",") if b]
    last_per_img = None
    for cache, bs in runs:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            print(f"skip {cache} batch {bs}: past the time budget", flush=True)
            continue
        worker = AnnotateWorker(worker_cfg(proc_dir, args, None if cache == "dynamic" else cache), model=model)
        worker.retry_single = False
        be = worker.backend
        # warm-up: kernels, cuBLAS handles; the static cache also compiles here (same shapes as the timed run)
        keep = be.max_new_tokens
        if cache == "dynamic":
            be.max_new_tokens = be.min_new_tokens = 4
        t0 = time.perf_counter()
        try:
            worker(batch_of(bs, args.image_size, rng))
        except Exception as e:  # e.g. compilation failing: report and go on with the next config
            print(f"{cache} batch {bs} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        sync()
        warm = time.perf_counter() - t0
        be.max_new_tokens = be.min_new_tokens = keep
        n_img = args.batch1_images if bs == 1 else bs
        n_calls = max(1, n_img // bs)
        batches = [batch_of(bs, args.image_size, rng) for _ in range(n_calls)]
        # count generated tokens once to prove "exactly N new tokens"
        inputs = be.build_inputs(batches[0]["pixels"][:1], batches[0]["caption"][:1])
        sync()
        t0 = time.perf_counter()
        for b in batches:
            res = worker(b)
        sync()
        dt = time.perf_counter() - t0
        ips = n_calls * bs / dt
        last_per_img = dt / (n_calls * bs)
        row = {"cache": cache, "batch": bs, "images": n_calls * bs, "seconds": round(dt, 3),
               "images_per_s": round(ips, 3), "ms_per_decode_step": round(1000 * dt / n_calls / args.new_tokens, 1),
               "warmup_s": round(warm, 1), "prompt_tokens": int(inputs["input_ids"].shape[1]),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        if args.out:  # after every config: a run killed at its time limit still leaves a table
            write_table(args, results)
        if args.profile and len(results) == 2:
            import cProfile
            import pstats

            be.max_new_tokens = be.min_new_tokens = 16
            pr = cProfile.Profile()
            pr.enable()
            worker(batch_of(bs, args.image_size, rng))
            sync()
            pr.disable()
            be.max_new_tokens = be.min_new_tokens = keep
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    print(f"total {time.perf_counter() - t_start:.1f}s", flush=True)


def write_table(args, results):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    base = next((r["images_per_s"] for r in results if r["batch"] == 1), None)
    lines = [f"Qwen2-VL-{args.dims} dimensions, random weights, {args.image_size}² images, exactly "
             f"{args.new_tokens} new tokens, greedy, {args.attn}, device: {dev}, torch {torch.__version__}.", "",
             "| KV cache | batch | images | seconds | images/s | × batch-1 | ms per token (call ÷ new tokens) | prompt tokens | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = f"{r['images_per_s'] / base:.1f}" if base else "–"
        lines.append(f"| {r['cache']} | {r['batch']} | {r['images']} | {r['seconds']} | {r['images_per_s']} | {speed} "
                     f"| {r['ms_per_decode_step']} | {r['prompt_tokens']} | {r['peak_gib']} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
