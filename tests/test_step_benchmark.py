"""The one-GPU 24 GB recipe and the benchmark plumbing around it, without a GPU: the launch script's
command line, the trainer rows' recipes composed on top of it, and the memory cap's device index."""
import sys
from pathlib import Path

import pytest
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
    # with a cache, the caption encodings come from it too (a later cache.prompts=false still wins)
    assert "cache.prompts=true" in launch_args(tmp_path, "cache.dir=data/cache-1024")
    assert "cache.prompts=true" not in launch_args(tmp_path) + launch_args(tmp_path, "cache.dir=null")
    # a later override still wins (Hydra: last value)
    assert launch_args(tmp_path, "train.micro_batch_size=3")[-1] == "train.micro_batch_size=3"


def test_one_and_three_gpu_scripts_launch_the_same_24gb_recipe(tmp_path):
    one, three = launch_args(tmp_path), launch_args(tmp_path, script="train_3gpu.sh")
    assert one[0] == "--num_gpus=1" and three[0] == "--num_gpus=3"
    assert one[1:] == three[1:] and "deepspeed=zero2" in three
    assert launch_args(tmp_path, "cache.dir=c", script="train_3gpu.sh")[1:] == launch_args(tmp_path, "cache.dir=c")[1:]


def test_trainer_recipes_compose_on_the_launch_script(tmp_path):
    from gill.training.ds_config import build_ds_config
    from step_benchmark import TRAINER_BASES, TRAINER_LEVERS, trainer_recipe

    script = [a for a in launch_args(tmp_path) if "=" in a and not a.startswith("-")]  # Hydra overrides only
    every_lever = "+".join(TRAINER_LEVERS)
    for base in TRAINER_BASES:
        name = f"{base}+{every_lever}"
        recipe = trainer_recipe(name)
        assert recipe["env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        cfg = compose([*script, "model=kolors_random", *recipe["overrides"]])
        assert cfg.cache.prompts and cfg.train.gc_freeze_after == 1 and cfg.model.compile_adapter, name
        assert not cfg.model.gradient_checkpointing.unet and not cfg.model.gradient_checkpointing.text_encoder, name
        ds = build_ds_config(cfg, 1, on_gpu=True)
        offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
        params = ds["optimizer"]["params"]
        if base == "offload":  # the previous recipe: DeepSpeedCPUAdam, not torch's AdamW
            assert offload and "torch_adam" not in params, (name, ds)
        else:  # optimizer state on the GPU, torch's fused AdamW (no DeepSpeed JIT build)
            assert not offload and params["torch_adam"] is True and params["fused"] is True, (name, ds)
        assert ds["zero_optimization"]["stage"] == 2
        assert cfg.model.name == "kolors_random"
    assert trainer_recipe("launch-int8+prompts")["overrides"][-1] == "cache.prompts=true"
    with pytest.raises(ValueError, match="lever"):
        trainer_recipe("launch+turbo")


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


def test_trainer_cache_encodes_prompts_with_the_quantization_the_row_trains_with(tmp_path, monkeypatch):
    """A cache whose prompt encodings are missing or come from another ChatGLM quantization than the run's is
    refused by the trainer (gill.data.encoder_cache), so a row's cache follows what the launch script hands the run
    (prompts with a cache, its quantization) unless the row overrides it."""
    import step_benchmark
    from step_benchmark import trainer_cache, trainer_recipe

    builds, run = [], step_benchmark.subprocess.run
    monkeypatch.setattr(step_benchmark.subprocess, "run",
                        lambda cmd, **kw: builds.append(cmd) if "gill.tools.build_encoder_cache" in cmd else run(cmd, **kw))
    for recipe, scheme in (("launch", "int8-g128-mlp"), ("launch+prompts", "int8-g128-mlp"),
                           ("launch-bf16", "null"), ("launch-int8+prompts", "int8")):
        path = trainer_cache(str(tmp_path), "1024", trainer_recipe(recipe)["overrides"])
        assert path.name == f"kolors_random_1024_prompts_{scheme}"
        assert builds[-1][-2:] == ["cache.prompts=true", f"model.quantize.text_encoder={scheme}"], builds[-1]
    # a row that opts out of the launch script's prompt encodings reads a cache without them
    assert trainer_cache(str(tmp_path), "1024", ["cache.prompts=false"]).name == "kolors_random_1024"
    assert "cache.prompts=true" not in builds[-1]
