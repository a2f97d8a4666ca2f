"""``python -m gill.tools.export``: a DeepSpeed checkpoint of a real (tiny, CPU) training run -> the same
``adapter.safetensors`` that training writes, with real tensor names, loadable for inference."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # trains in a child process
def test_export_checkpoint_equals_the_adapter_training_writes(tiny_stack_dir, tmp_path, child_env):
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(ROOT / "train_ds.py"), f"model.pretrained_path={tiny_stack_dir}",
         f"train.output_dir={out}", "data.val=null", "train.max_steps=2", "train.save_every=2"],
        capture_output=True, text=True, env=child_env, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000002"
    written = load_file(str(out / "adapter.safetensors"))

    # what DeepSpeed's zero_to_fp32 gives: the engine's module with the adapter as one flat tensor
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert [k for k in merged if k.startswith("adapter.")] == ["adapter.flat"]

    export = subprocess.run([sys.executable, "-m", "gill.tools.export", str(ckpt), "--out", str(tmp_path / "a.safetensors")],
                            capture_output=True, text=True, env=child_env, timeout=300, cwd=ROOT)
    assert export.returncode == 0, export.stderr[-3000:]
    got = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(got) == sorted(written) and len(got) > 10
    for name, tensor in written.items():
        assert torch.equal(got[name], tensor), name
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(out / "adapter.safetensors"), "pt") as b:
        ma, mb = a.metadata(), b.metadata()
    assert ma["format"] == mb["format"] and ma["step"] == mb["step"] == "2"
    assert json.loads(ma["config"])["model"] == json.loads(mb["config"])["model"]

    # zero_to_fp32's own output (saved as safetensors) converts the same way
    save_file({k: v.contiguous() for k, v in merged.items() if k.startswith("adapter.")}, str(tmp_path / "z.safetensors"))
    from gill.tools.export import export_checkpoint

    export_checkpoint(tmp_path / "z.safetensors", tmp_path / "b.safetensors", config=out / "config.yaml")
    again = load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in written.items())

    from gill.inference.loading import load_trained

    model = load_trained(tmp_path / "a.safetensors", {"pretrained_path": tiny_stack_dir}, device="cpu", dtype="fp32")
    assert torch.equal(model.adapter.state_dict()["img_tokens"], written["img_tokens"])
