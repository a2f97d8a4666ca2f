"""``python -m gill.tools.params [hydra overrides]``: parameter tables of the frozen stack and the adapter.

    python -m gill.tools.params model=kolors_random                                  # real Kolors dimensions
    python -m gill.tools.params model=kolors_random model.adapter.spatial.injection=cross model.adapter.spatial.inner_dim=176

``kolors_random`` is counted on the meta device (nothing is allocated); other presets are loaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gill.models.adapter import GillAdapter
from gill.models.stack import build_random_modules, load_stack, parameter_table, stack_parameter_rows

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def tables(overrides: list[str]) -> tuple[str, str]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    m = cfg.model
    if m.name == "kolors_random":
        modules = build_random_modules("meta", torch.bfloat16)
    else:
        modules = load_stack(m, device="cpu").modules()
    llm_dim = modules["text_encoder"].config.hidden_size
    vision_dim = modules["vision"].config.projection_dim
    with torch.device("meta"):
        adapter = GillAdapter(m.adapter, llm_dim=llm_dim, vision_dim=vision_dim,
                              prompt_len=m.prompt_max_length, unet=modules["unet"])
    stack_rows = stack_parameter_rows(modules)
    adapter_rows = list(adapter.parameter_groups().items())
    spatial = sum(n for name, n in adapter_rows if name.startswith("spatial"))
    adapter_rows.append((f"(spatial adapter: {m.adapter.spatial.injection}, "
                         f"{len(adapter.spatial.layers)} blocks, inner {m.adapter.spatial.inner_dim})", spatial))
    return parameter_table(stack_rows), parameter_table(adapter_rows[:-1]) + f"\n\nspatial adapter total: {spatial:,}"


def main(argv=None) -> None:
    stack, adapter = tables(list(sys.argv[1:] if argv is None else argv))
    print("Frozen stack\n" + stack + "\n\nAdapter (trainable)\n" + adapter)


if __name__ == "__main__":
    main()
