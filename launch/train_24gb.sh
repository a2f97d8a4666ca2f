#!/usr/bin/env bash
# The 24 GB recipe (benchmarks/NOTES.md, "24 GiB card") on NUM_GPUS GPUs (default 1; launch/train_1gpu.sh and
# launch/train_3gpu.sh set it): ZeRO-2 with the optimizer state on the GPU (torch's fused AdamW, no CPU offload),
# ChatGLM's MLP linears in weight-only int8 with a scale per 128 columns (`int8-g128-mlp`: 11.63 -> 7.38 GiB; losses
# within 0.71% and adapter-gradient cosine >= 0.991 against bf16 on random Kolors-size weights), UNet and ChatGLM
# checkpointed, regional compile (model=kolors: UNet transformer blocks whole, the spatial adapter's injection inside),
# the garbage collector's heap frozen after the compiling step. Micro-batch 8 from images (planned 20.7 GiB reserved);
# with the encoder cache (cache.dir=..., built first with `python -m gill.tools.build_encoder_cache ...
# model.quantize.text_encoder=int8-g128-mlp cache.prompts=true`) micro-batch 10 and the caption encodings read from
# the cache: 9.78 samples/s = 26.7% MFU at 21.8 GiB reserved on an H200 capped at 24 GiB over 62 steps, 8.58 on a
# slower host (2026-12-03; cache.prompts=false for a cache without them).
# Later arguments override these.
#   launch/train_24gb.sh model.pretrained_path=/models/Kolors-diffusers model.vision_path=/models/clip-vit-large-patch14-336 \
#       data=layout data.path=data/layout.jsonl [cache.dir=data/cache-1024 data.random_flip=0]
# ChatGLM in bf16 instead (the previous recipe, micro-batch 2 / 4 with the cache):
#   add model.quantize.text_encoder=null model.gradient_checkpointing.text_encoder=false train.micro_batch_size=4
set -euo pipefail
cd "$(dirname "$0")/.."
mb=8
cached=()
for arg in "$@"; do
    case "$arg" in
        cache.dir=null|cache.dir=) ;;
        cache.dir=*) mb=10; cached=(cache.prompts=true) ;;
    esac
done
exec deepspeed --num_gpus="${NUM_GPUS:-1}" train_ds.py model=kolors train.micro_batch_size="$mb" "${cached[@]}" \
    model.quantize.text_encoder=int8-g128-mlp model.gradient_checkpointing.text_encoder=true train.gc_freeze_after=1 \
    deepspeed=zero2 +deepspeed.overrides.optimizer.params.torch_adam=true +deepspeed.overrides.optimizer.params.fused=true \
    train.max_steps=10000 train.save_every=500 train.val_every=500 "$@"
