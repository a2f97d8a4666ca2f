#!/usr/bin/env python
"""Train the GILL adapter on the frozen Kolors stack with DeepSpeed, configured by Hydra.

    python train_ds.py                                   # tiny stack, synthetic data, one process
    deepspeed --num_gpus=3 train_ds.py model=kolors model.pretrained_path=... data=layout data.path=...
    torchrun --nproc_per_node=2 train_ds.py train.max_steps=100

Config reference: docs/configuration.md; launch scripts, sweeps and resume: docs/launching.md.
"""
import sys

from gill.training.distributed import strip_local_rank
from gill.training.recipe import hydra_rank_overrides

# The deepspeed launcher appends --local_rank=N, which Hydra would reject.
sys.argv = strip_local_rank(sys.argv) + hydra_rank_overrides()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    from gill.training.distributed import exit_now, shutdown
    from gill.training.recipe import run

    run(cfg, HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # a one-process sweep's next job reuses the group
        shutdown()
        exit_now()


if __name__ == "__main__":
    main()
