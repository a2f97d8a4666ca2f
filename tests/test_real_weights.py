"""The published Kolors file layout: fp16 variant files, a 3-shard text encoder with its fp16 index, a
vision tower that ships only ``pytorch_model.bin`` (DESIGN §3). The tiny stack written in that layout
loads through ``model=kolors``, trains, and builds the encoder cache; the .bin is never unpickled beyond
tensors; ``model=kolors`` trains at 1024 px without a second override."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gill.tools.build_encoder_cache import compose_config
from gill.models.stack import ensure_tiny_stack, load_frozen_encoders, load_stack
from gill.models.tiny_stack import TINY_VERSION

ROOT = Path(__file__).resolve().parent.parent
SHARDS = [f"model.fp16-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]

# model=kolors with the tiny stack's sizes: the preset's path (variant, checkpointing, 256-token
# prompts) at a size a CPU trains in seconds.
KOLORS_AT_TINY_SIZE = [
    "model=kolors", "train.resolution=64", "model.compile=false",
    "model.adapter.retrieval_dim=32", "model.adapter.mapper.width=32", "model.adapter.mapper.encoder_layers=1",
    "model.adapter.mapper.decoder_layers=1", "model.adapter.mapper.heads=2", "model.adapter.spatial.inner_dim=16",
    "model.adapter.spatial.token_dim=32", "model.adapter.spatial.tokenizer_hidden=32",
    "model.adapter.spatial.head_dim=8",
]


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gill-published")
    return ensure_tiny_stack(str(root / f"tiny-{TINY_VERSION}-published"), layout="published")


def kolors_cfg(path, vision_path=None, **kw) -> dict:
    return {"name": "kolors", "pretrained_path": str(path),
            "vision_path": str(vision_path or os.path.join(path, "image_encoder")), "variant": "fp16",
            "dtype": "fp32", **kw}


def weight_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".index.fp16.json")))


def test_published_layout_on_disk(published_dir):
    d = Path(published_dir)
    assert weight_files(d / "unet") == ["diffusion_pytorch_model.fp16.safetensors"]
    assert weight_files(d / "vae") == ["diffusion_pytorch_model.fp16.safetensors"]
    assert weight_files(d / "text_encoder") == sorted(["model.safetensors.index.fp16.json", *SHARDS])
    assert weight_files(d / "image_encoder") == ["pytorch_model.bin"]
    assert (d / "image_encoder" / "preprocessor_config.json").is_file()
    index = json.loads((d / "text_encoder" / "model.safetensors.index.fp16.json").read_text())
    assert set(index["weight_map"].values()) == set(SHARDS)
    total, stored = 0, set()
    for shard in SHARDS:
        with safe_open(str(d / "text_encoder" / shard), framework="pt") as f:
            keys = list(f.keys())
            assert keys and all(index["weight_map"][k] == shard for k in keys)
            assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
            total += sum(f.get_tensor(k).numel() * 2 for k in keys)
            stored.update(keys)
    assert index["metadata"]["total_size"] == total and stored == set(index["weight_map"])
    for sub in ("unet", "vae"):
        with safe_open(str(d / sub / "diffusion_pytorch_model.fp16.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, sub
    state = torch.load(d / "image_encoder" / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert (d / "TINY_VERSION").read_text().split() == [TINY_VERSION, "published"]


def test_published_layout_loads_the_same_models(published_dir, tiny_stack, caplog):
    """model=kolors (variant fp16) on the published files gives the plain tiny stack's weights rounded to
    fp16, cast to the run dtype (fp32 on CPU), and logs which file each component came from."""
    with caplog.at_level(logging.INFO, logger="gill.models.stack"):
        stack = load_stack(kolors_cfg(published_dir))
    log = caplog.text
    assert "unet: diffusion_pytorch_model.fp16.safetensors" in log
    assert "vae: diffusion_pytorch_model.fp16.safetensors" in log
    assert "text_encoder: model.safetensors.index.fp16.json" in log
    assert "vision: pytorch_model.bin" in log and "weights_only=True" in log
    for name, module in stack.modules().items():
        plain = dict(tiny_stack.modules()[name].named_parameters())
        params = dict(module.named_parameters())
        assert params.keys() == plain.keys(), name
        for k, p in params.items():
            assert p.dtype == torch.float32 and not p.requires_grad, (name, k)
            assert torch.equal(p, plain[k].half().float()), (name, k)
    # bf16 (the GPU run dtype): the VAE stays out of fp16 either way
    bf16 = load_stack({**kolors_cfg(published_dir), "dtype": "bf16"})
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16
    assert bf16.vision.dtype == torch.bfloat16


def test_published_layout_needs_the_variant(published_dir):
    with pytest.raises(FileNotFoundError, match=r"unet: no weight file.*set model.variant=fp16"):
        load_stack(kolors_cfg(published_dir, variant=None))
    with pytest.raises(FileNotFoundError, match=r"unet: no weight file.*diffusion_pytorch_model.bf16.safetensors"
                                                r".*diffusion_pytorch_model.safetensors.*set model.variant=fp16"):
        load_stack(kolors_cfg(published_dir, variant="bf16"))


def test_vision_bin_is_read_with_weights_only(published_dir, tmp_path):
    """A pytorch_model.bin that would run code when unpickled is refused, and the code does not run."""
    vision = tmp_path / "image_encoder"
    shutil.copytree(Path(published_dir) / "image_encoder", vision)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    state = torch.load(vision / "pytorch_model.bin", weights_only=True)
    state["visual_projection.weight"] = Payload()
    torch.save(state, vision / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        load_frozen_encoders(kolors_cfg(published_dir, vision_path=vision))
    assert not marker.exists()


def test_vision_tower_from_a_full_clip_checkpoint(published_dir, tmp_path):
    """openai/clip-vit-large-patch14-336 ships a whole CLIPModel (text + vision) as model.safetensors with a
    composite config: the vision tower and its projection load from it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from gill.models.tiny_stack import TINY_CLIP_IMAGE_SIZE, TINY_CLIP_VISION_CONFIG

    torch.manual_seed(0)
    # As in openai's config.json, vision_config repeats projection_dim (the vision-only class reads it there).
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99),
        vision_config=TINY_CLIP_VISION_CONFIG, projection_dim=TINY_CLIP_VISION_CONFIG["projection_dim"]))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
                       crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
                       ).save_pretrained(tmp_path / "clip")
    assert weight_files(tmp_path / "clip") == ["model.safetensors"]
    _, vision, _ = load_frozen_encoders(kolors_cfg(published_dir, vision_path=tmp_path / "clip"))
    assert torch.equal(vision.visual_projection.weight, clip.visual_projection.weight)
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(vision.vision_model.state_dict()[k], v), k


def test_kolors_preset_trains_at_1024_unless_overridden():
    kolors = compose_config(["model=kolors"])
    assert kolors.train.resolution == 1024 and kolors.model.variant == "fp16"
    assert compose_config(["model=kolors", "train.resolution=512"]).train.resolution == 512
    assert compose_config(["model=kolors_random"]).train.resolution == 1024
    tiny = compose_config([])
    assert tiny.train.resolution == 64 and tiny.model.variant is None
    assert compose_config(["model=tiny", "train.resolution=128"]).train.resolution == 128
    for script in ("train_24gb.sh", "train_multinode.sh"):
        text = (ROOT / "launch" / script).read_text()
        assert "model=kolors" in text and "train.resolution" not in text, script


@pytest.mark.slow  # builds the cache and trains in child processes
def test_model_kolors_builds_the_cache_and_trains_from_published_files(published_dir, tmp_path, child_env):
    """`python -m gill.tools.build_encoder_cache` and `train_ds.py` with model=kolors pointed at the published-layout files."""
    paths = [f"model.pretrained_path={published_dir}", f"model.vision_path={published_dir}/image_encoder"]
    common = [*KOLORS_AT_TINY_SIZE, *paths, f"cache.dir={tmp_path / 'c'}", "cache.prompts=true", "data.num_samples=6"]
    proc = subprocess.run([sys.executable, "-m", "gill.tools.build_encoder_cache", *common], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 6
    assert "vae: diffusion_pytorch_model.fp16.safetensors" in proc.stderr
    assert "vision: pytorch_model.bin" in proc.stderr
    assert "text_encoder: model.safetensors.index.fp16.json" in proc.stderr  # cache.prompts: ChatGLM's sharded fp16 files
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["fingerprint"]["model"]["vision_weights"][0][0] == "pytorch_model.bin"
    assert [w[0] for w in manifest["fingerprint"]["prompts"]["text_encoder_weights"]] == [
        f"model.fp16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train_ds.py", *common, f"train.output_dir={out}", "train.max_steps=2",
         "train.save_every=0", "data.val=null"],
        cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train_ds.log").read_text()
    assert "records, with prompt encodings)" in log
    for line in ("unet: diffusion_pytorch_model.fp16.safetensors", "text_encoder: model.safetensors.index.fp16.json",
                 "vision: pytorch_model.bin"):
        assert line in log, line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    losses = [v for r in train for k, v in r.items() if k.endswith("/loss")]
    assert len(losses) == 2 * 3 and all(abs(v) < float("inf") for v in losses)
    assert all(r["skipped"] == 0 for r in train)
    assert (out / "adapter.safetensors").is_file()
