#!/usr/bin/env bash
# The reference box, 3 x 24 GB (RTX 4090): the recipe of launch/train_24gb.sh on 3 GPUs (NUM_GPUS=N for another
# count). Measured on one capped GPU; its 3-GPU scaling is not measured yet (docs/next_steps.md).
#   launch/train_3gpu.sh model.pretrained_path=/models/Kolors-diffusers model.vision_path=... data=layout data.path=...
NUM_GPUS="${NUM_GPUS:-3}" exec bash "$(dirname "$0")/train_24gb.sh" "$@"
