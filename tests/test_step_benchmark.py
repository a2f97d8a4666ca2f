"""The one-GPU 24 GB recipe and the benchmark plumbing around it, without a GPU: the launch script's
command line, the trainer rows' recipes composed on top of it, and the memory cap's device index."""
import sys
from pathlib import Path

import torch

from conftest import launch_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose("config", overrides=list(overrides))


def test_launch_script_micro_batch_follows_the_encoder_cache(tmp_path):
    assert "train.micro_batch_size=8" in launch_args(tmp_path)
    assert "train.micro_batch_size=8" in launch_args(tmp_path, "cache.dir=null")
    assert "train.micro_batch_size=10" in launch_args(tmp_path, "cache.dir=data/cache-1024")
    assert "model.quantize.text_encoder=int8-g128-mlp" in launch_args(tmp_path)
    # a later override still wins (Hydra: last value)
    assert launch_args(tmp_path, "train.micro_batch_size=3")[-1] == "train.micro_batch_size=3"


def test_one_and_three_gpu_scripts_launch_the_same_24gb_recipe(tmp_path):
    one, three = launch_args(tmp_path), launch_args(tmp_path, script="train_3gpu.sh")
    assert one[0] == "--num_gpus=1" and three[0] == "--num_gpus=3"
    assert one[1:] == three[1:] and "deepspeed=zero2" in three
    assert launch_args(tmp_path, "cache.dir=c", script="train_3gpu.sh")[1:] == launch_args(tmp_path, "cache.dir=c")[1:]


def test_trainer_recipes_compose_on_the_launch_script(tmp_path):
    from gill.training.ds_config import build_ds_config
    from step_benchmark import TRAINER_RECIPES

    script = [a for a in launch_args(tmp_path) if "=" in a and not a.startswith("-")]  # Hydra overrides only
    for name, recipe in TRAINER_RECIPES.items():
        cfg = compose([*script, "model=kolors_random", *recipe["overrides"]])
        ds = build_ds_config(cfg, 1, on_gpu=True)
        offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
        params = ds["optimizer"]["params"]
        if name == "offload":  # the previous recipe: DeepSpeedCPUAdam, not torch's AdamW
            assert offload and "torch_adam" not in params, (name, ds)
        else:  # optimizer state on the GPU, torch's fused AdamW (no DeepSpeed JIT build)
            assert not offload and params["torch_adam"] is True and params["fused"] is True, (name, ds)
        assert ds["zero_optimization"]["stage"] == 2
        assert cfg.model.name == "kolors_random"


def test_cap_gpu_memory_passes_a_device_index(monkeypatch):
    """torch 2.11 refuses torch.device("cuda") without an index in set_per_process_memory_fraction."""
    from gill.tools.resources import GiB, cap_gpu_memory

    calls = []

    def set_fraction(fraction, device=None):
        if not isinstance(device, int):
            raise ValueError(f"Expected a cuda device with a specified index, got {device!r}")
        calls.append((fraction, device))

    class Props:
        total_memory = 96 * GiB

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cap_gpu_memory(torch.device("cuda"), 24) == 0.25
    assert cap_gpu_memory(torch.device("cuda", 1), None) == 1.0
    assert calls == [(0.25, 0), (1.0, 1)]
    assert cap_gpu_memory(torch.device("cpu"), 24) is None


def test_es_suffix_adds_expandable_segments_to_any_variant():
    from step_benchmark import VARIANTS, variant_spec

    assert variant_spec("tuned-z2+compile+es") == dict(VARIANTS["tuned-z2+compile"], es=True)
    assert "es" not in variant_spec("tuned-z2+compile")
