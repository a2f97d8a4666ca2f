#!/usr/bin/env bash
# One 24 GB card: the recipe of launch/train_24gb.sh on one GPU. Arguments are Hydra overrides.
NUM_GPUS=1 exec bash "$(dirname "$0")/train_24gb.sh" "$@"
