#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile (one line per node: "host slots=N"), see launch/hostfile.example.
# Run on the first node; it reaches the others over passwordless ssh. The output folder must be on a
# filesystem every node sees (checkpoints are written by all ranks), so pass train.output_dir explicitly.
#   launch/train_multinode.sh launch/hostfile train.output_dir=/shared/runs/exp1 model.pretrained_path=... data=layout data.path=...
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile=${1:?usage: train_multinode.sh HOSTFILE key=value ...}
shift
exec deepspeed --hostfile="$hostfile" --master_port="${MASTER_PORT:-29500}" train_ds.py model=kolors \
    train.micro_batch_size=1 "$@"
