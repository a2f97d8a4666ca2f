"""Hydra entry point: ``python -m gill.annotate [key=value ...]`` with ``conf/annotate.yaml``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# conf/ sits at the repository root beside the package; GILL_CONF_DIR overrides it for installed use
CONF_DIR = os.environ.get("GILL_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


@hydra.main(config_path=CONF_DIR, config_name="annotate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from gill.annotate.pipeline import run_annotation

    summary = run_annotation(cfg)
    if summary["processed"] == 0 and summary["items_read"] == 0:
        sys.exit("no input records found")


if __name__ == "__main__":
    main()
