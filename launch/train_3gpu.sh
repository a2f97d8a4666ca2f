#!/usr/bin/env bash
# The seed's box: 3 x 24 GB (RTX 4090), ZeRO-2 with the CPU-offloaded optimizer, all three modes.
# Other strategies are one override: deepspeed=zero2 (no offload) or deepspeed=zero0 (plain data parallel).
#   launch/train_3gpu.sh model.pretrained_path=/models/Kolors-diffusers model.vision_path=... data=layout data.path=...
# NUM_GPUS=1 runs the same recipe on one GPU (the scaling baseline of benchmarks/scaling.py); it needs
# train.micro_batch_size=2 there, since retrieval's negatives need two samples per step across ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus="${NUM_GPUS:-3}" train_ds.py model=kolors deepspeed=zero2_offload \
    train.micro_batch_size=1 train.grad_accum=4 train.max_steps=10000 train.save_every=500 train.val_every=500 "$@"
