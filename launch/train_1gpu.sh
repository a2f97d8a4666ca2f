#!/usr/bin/env bash
# One GPU: ZeRO-2 with the optimizer offloaded to the CPU (the default), real Kolors weights.
#   launch/train_1gpu.sh model.pretrained_path=/models/Kolors-diffusers model.vision_path=/models/clip-vit-large-patch14-336 \
#       data=layout data.path=data/layout.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus=1 train_ds.py model=kolors train.micro_batch_size=1 \
    train.max_steps=10000 train.save_every=500 train.val_every=500 "$@"
