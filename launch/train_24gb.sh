#!/usr/bin/env bash
# The 24 GB recipe (benchmarks/NOTES.md, "24 GiB card") on NUM_GPUS GPUs (default 1; launch/train_1gpu.sh and
# launch/train_3gpu.sh set it): ZeRO-2 with the optimizer state on the GPU
# (torch's fused AdamW, no CPU offload: 1.36x the offloaded step at micro-batch 4 under a 24 GiB cap), UNet
# checkpointed, ChatGLM not, regional compile. Micro-batch 2 from images (~21.3 GiB reserved); 4 with the encoder
# cache (cache.dir=..., `python -m gill.tools.build_encoder_cache` first; ~23.4-23.6 GiB reserved). Later arguments override these.
#   launch/train_24gb.sh model.pretrained_path=/models/Kolors-diffusers model.vision_path=/models/clip-vit-large-patch14-336 \
#       data=layout data.path=data/layout.jsonl [cache.dir=data/cache-1024 data.random_flip=0]
# 2.1x faster, opt-in (ChatGLM in weight-only int8; its quality guard is not met on random weights, benchmarks/NOTES.md):
#   add model.quantize.text_encoder=int8 model.gradient_checkpointing.text_encoder=true train.micro_batch_size=12
set -euo pipefail
cd "$(dirname "$0")/.."
mb=2
for arg in "$@"; do
    case "$arg" in
        cache.dir=null|cache.dir=) ;;
        cache.dir=*) mb=4 ;;
    esac
done
exec deepspeed --num_gpus="${NUM_GPUS:-1}" train_ds.py model=kolors train.micro_batch_size="$mb" \
    deepspeed=zero2 +deepspeed.overrides.optimizer.params.torch_adam=true +deepspeed.overrides.optimizer.params.fused=true \
    train.max_steps=10000 train.save_every=500 train.val_every=500 "$@"
