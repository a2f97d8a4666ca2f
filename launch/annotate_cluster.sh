#!/usr/bin/env bash
# Layout annotation on a Ray cluster: one GPU actor per GPU (DESIGN §8).
#
#   On the head node:     ray start --head --port=6379
#   On each worker node:  ray start --address=HEAD_IP:6379
#   Then, on the head:    launch/annotate_cluster.sh source.kind=wukong_csv source.path=wukong_release/part-0.csv \
#                             source.image_root=/data/wukong/images output.path=/data/wukong/layout.jsonl
#
# NUM_GPUS (default: all GPUs the cluster reports) sets the actor pool size. Re-running the same command
# resumes: ids already in the output or errors file are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_ADDRESS=${RAY_ADDRESS:-auto}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python -c "import ray; ray.init(address='$RAY_ADDRESS', log_to_driver=False); print(int(ray.cluster_resources().get('GPU', 0)))")
fi
if [[ "$NUM_GPUS" -lt 1 ]]; then
  echo "no GPUs in the Ray cluster at $RAY_ADDRESS" >&2
  exit 1
fi
exec python -m gill.annotate ray.enabled=true ray.address="$RAY_ADDRESS" ray.num_actors="$NUM_GPUS" \
  ray.num_gpus_per_actor=1 batch_size="${BATCH_SIZE:-256}" backend.cache_implementation="${CACHE:-null}" "$@"
