"""The encoder cache (``python -m gill.tools.build_encoder_cache``, gill/data/encoder_cache.py): shards and manifest hold what the
frozen encoders compute, an interrupted build resumes to the same bytes, a training step from the
cache equals one from images, stale/incomplete caches and random augmentations are refused before
any model loads, malformed records are skipped and counted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gill.tools.build_encoder_cache import build_cache, compose_config
from gill.data.encoder_cache import MANIFEST, CacheError, open_cache, read_shard_meta
from gill.data.collate import build_dataset, collate_layout
from gill.data.synthetic import SyntheticLayoutDataset, write_jsonl
from gill.models.model import MODES, GillModel, clip_image_embeds, vae_posterior
from gill.models.stack import load_frozen_encoders, load_stack

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(stack_dir, cache_dir, *extra):
    size = [] if "data=layout" in extra else ["data.num_samples=10"]
    return compose_config([f"model.pretrained_path={stack_dir}", f"cache.dir={cache_dir}", *size,
                           "cache.shard_size=4", "cache.batch_size=3", *extra])


def read_cache(root: Path) -> dict:
    """Everything a cache is: manifest + every shard's tensors (as bytes) and metadata."""
    out = {"manifest": json.loads((root / MANIFEST).read_text())}
    for shard in sorted(root.glob("shard_*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out[shard.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def test_build_writes_encoder_outputs_and_manifest(tiny_stack_dir, tmp_path):
    cfg = cfg_for(tiny_stack_dir, tmp_path / "c")
    manifest = build_cache(cfg)
    assert manifest["complete"] and manifest["records"] == 10 and manifest["num_items"] == 10
    assert sorted(manifest["shards"]) == [f"shard_0000{j}.safetensors" for j in range(3)]
    assert [manifest["shards"][s]["records"] for s in sorted(manifest["shards"])] == [4, 4, 2]
    fp = manifest["fingerprint"]
    assert fp["resolution"] == 64 and fp["dtype"] == "fp32" and fp["data"]["num_samples"] == 10
    assert fp["model"]["path"] == tiny_stack_dir and fp["model"]["vae_config_sha256"]
    assert not list((tmp_path / "c").glob("*.tmp"))

    # Shard 1 = items 4..7: the posterior and embeddings of the preprocessed images, plus their metadata.
    ds = SyntheticLayoutDataset(10, resolution=64, seed=0)
    items = [ds[i] for i in range(4, 8)]
    vae, vision, processor = load_frozen_encoders(cfg.model, device="cpu", dtype=torch.float32)
    mean, std = vae_posterior(vae, [it["image"] for it in items])
    embeds = clip_image_embeds(vision, processor, [it["image"] for it in items])
    with safe_open(str(tmp_path / "c" / "shard_00001.safetensors"), framework="pt") as f:
        assert f.get_tensor("latent_mean").shape == (4, 4, 16, 16)
        # batches of 3 in the build vs 4 here: the same numbers up to CPU kernel blocking
        torch.testing.assert_close(f.get_tensor("latent_mean"), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.get_tensor("latent_std"), std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.get_tensor("image_embeds"), embeds, rtol=1e-5, atol=1e-6)
    meta = read_shard_meta(tmp_path / "c" / "shard_00001.safetensors")
    assert [r["index"] for r in meta["records"]] == [4, 5, 6, 7] and meta["skipped"] == []
    for rec, it in zip(meta["records"], items):
        assert rec["id"] == it["id"] and rec["caption"] == it["caption"]
        assert [(o["label"], tuple(o["bbox"])) for o in rec["objects"]] == [(o["label"], o["bbox"]) for o in it["objects"]]

    cached = open_cache(cfg, build_dataset(cfg.data, 64, 0), on_gpu=False)
    assert len(cached) == 10 and cached[5]["id"] == items[1]["id"]
    torch.testing.assert_close(cached[5]["latent_mean"], mean[1], rtol=1e-5, atol=1e-6)
    batch = collate_layout([cached[i] for i in range(3)])
    assert "images" not in batch and batch["latent_std"].shape == (3, 4, 16, 16)
    assert batch["vision_features"].shape == (3, 32) and batch["boxes"].shape[0] == 3


def test_interrupted_build_resumes_to_the_same_cache(tiny_stack_dir, tmp_path):
    build_cache(cfg_for(tiny_stack_dir, tmp_path / "whole"))

    class Crash(RuntimeError):
        pass

    def crash_after_first(j):
        if j == 0:
            raise Crash

    cfg = cfg_for(tiny_stack_dir, tmp_path / "split")
    with pytest.raises(Crash):
        build_cache(cfg, after_shard=crash_after_first)
    manifest = json.loads((tmp_path / "split" / MANIFEST).read_text())
    assert not manifest["complete"] and list(manifest["shards"]) == ["shard_00000.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(cfg, build_dataset(cfg.data, 64, 0), on_gpu=False)
    # What a kill can leave besides: a half-written temp file, and a renamed shard the manifest
    # does not list yet (here: garbage). Both must be replaced, never trusted.
    (tmp_path / "split" / "shard_00001.safetensors.tmp").write_bytes(b"half a shard")
    (tmp_path / "split" / "shard_00002.safetensors").write_bytes(b"not listed in the manifest")

    rebuilt = []
    build_cache(cfg, after_shard=rebuilt.append)
    assert rebuilt == [1, 2], "complete shards are skipped, the rest rebuilt"
    whole, split = read_cache(tmp_path / "whole"), read_cache(tmp_path / "split")
    assert whole["manifest"] == {**split["manifest"], "fingerprint": whole["manifest"]["fingerprint"]}
    assert whole["manifest"]["fingerprint"]["data"] == split["manifest"]["fingerprint"]["data"]
    assert set(whole) == set(split)
    for name in whole:
        if name != "manifest":
            assert whole[name][1] == split[name][1]
            for k, t in whole[name][0].items():
                assert torch.equal(t, split[name][0][k]), (name, k)
    assert not list((tmp_path / "split").glob("*.tmp"))


@pytest.mark.parametrize("prompts", [False, True], ids=["encoders", "encoders+prompts"])
def test_training_step_from_cache_matches_step_from_images(tiny_stack_dir, tmp_path, prompts):
    """Same seed, same items: the losses and the adapter's gradients of all three modes agree.
    The only difference is the encoders' batch composition (the cache encoded 3 items at a time,
    the image run 2): on CPU fp32 that moves the posterior in the last bits, measured: losses
    within 1.2e-7 (one ulp), gradients within 8e-7. (On an H200 in bf16 the losses were equal.)
    With ``cache.prompts`` the generation mode reads the caption encodings from the cache: ChatGLM's
    prompt pass is not run at all (it raises here), and the step is the same."""
    cfg = cfg_for(tiny_stack_dir, tmp_path / "c", *(["cache.prompts=true"] if prompts else []))
    build_cache(cfg)
    images = build_dataset(cfg.data, 64, 0)
    cached = open_cache(cfg, images, on_gpu=False)
    torch.manual_seed(0)
    model = GillModel(load_stack(cfg.model, device="cpu", dtype=torch.float32), cfg.model)
    model.empty_prompt()  # the dropped-caption encoding, computed once per run either way
    online = model.prompt_encoding

    def step(batch):
        model.seed(123)
        model.zero_grad(set_to_none=True)
        losses = {}
        for mode in MODES:
            out = model(batch, mode)
            out["loss"].backward()
            losses[mode] = out["loss"].item()
            if mode == "generation":
                losses["diffusion"] = out["diffusion_loss"].item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses, grads

    idx = [2, 7]
    from_images = step(collate_layout([images[i] for i in idx]))
    batch = collate_layout([cached[i] for i in idx])
    assert ("prompt_embeds" in batch) == prompts
    if prompts:
        embeds, pooled = online(batch["captions"])
        torch.testing.assert_close(batch["prompt_embeds"], embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["prompt_pooled"], pooled, rtol=1e-5, atol=1e-5)

        def no_prompt_pass(captions):
            raise AssertionError("ChatGLM's prompt pass ran although the batch carries cached encodings")

        model.prompt_encoding = no_prompt_pass
    from_cache = step(batch)
    assert from_images[0].keys() == from_cache[0].keys()
    for k, v in from_images[0].items():
        assert from_cache[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert from_images[1].keys() == from_cache[1].keys() and len(from_images[1]) > 0
    for n, g in from_images[1].items():
        torch.testing.assert_close(from_cache[1][n], g, rtol=1e-4, atol=1e-6)


def test_stale_or_incomplete_cache_refused_before_any_model_loads(tiny_stack_dir, tmp_path, monkeypatch):
    import gill.models.stack
    from gill.training.recipe import run

    build_cache(cfg_for(tiny_stack_dir, tmp_path / "c"))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the cache was checked")

    monkeypatch.setattr(gill.models.stack, "load_stack", no_model)
    monkeypatch.setattr(gill.models.stack, "load_frozen_encoders", no_model)
    out = f"train.output_dir={tmp_path / 'run'}"
    with pytest.raises(CacheError, match=r"(?s)resolution: cache 64, config 128.*python -m gill.tools.build_encoder_cache"):
        run(cfg_for(tiny_stack_dir, tmp_path / "c", "train.resolution=128", out))
    with pytest.raises(CacheError, match="data.num_samples: cache 10, config 12"):
        run(cfg_for(tiny_stack_dir, tmp_path / "c", "data.num_samples=12", out))
    with pytest.raises(CacheError, match="no encoder cache there"):
        run(cfg_for(tiny_stack_dir, tmp_path / "nothing", out))
    # the build refuses to mix configs in one folder too (unless cache.overwrite=true)
    with pytest.raises(CacheError, match="cache.overwrite=true"):
        build_cache(cfg_for(tiny_stack_dir, tmp_path / "c", "data.seed=1"))
    # a shard gone missing after the build
    (tmp_path / "c" / "shard_00002.safetensors").unlink()
    with pytest.raises(CacheError, match="shard_00002.safetensors: missing"):
        run(cfg_for(tiny_stack_dir, tmp_path / "c", out))
    # random augmentations cannot be cached
    jsonl = write_jsonl(SyntheticLayoutDataset(3, resolution=64, seed=0), tmp_path / "data")
    for aug in ("data.random_flip=0.5", "data.center_crop=false"):
        layout = ("data=layout", f"data.path={jsonl}", "data.random_flip=0", aug)
        with pytest.raises(CacheError, match="random augmentations"):
            run(cfg_for(tiny_stack_dir, tmp_path / "c2", *layout, out))
        with pytest.raises(CacheError, match="random augmentations"):
            build_cache(cfg_for(tiny_stack_dir, tmp_path / "c2", *layout))


def test_prompt_encodings_follow_the_config(tiny_stack_dir, tmp_path):
    """A run that wants cached prompt encodings refuses a cache without them, or one encoded under another
    ChatGLM quantization; a cache with them still serves a run that encodes its prompts itself."""
    plain, with_prompts = tmp_path / "plain", tmp_path / "prompts"
    build_cache(cfg_for(tiny_stack_dir, plain))
    build_cache(cfg_for(tiny_stack_dir, with_prompts, "cache.prompts=true"))
    dataset = build_dataset(cfg_for(tiny_stack_dir, plain).data, 64, 0)
    with pytest.raises(CacheError, match=r"(?s)prompts.max_length: cache null, config 32.*build_encoder_cache"):
        open_cache(cfg_for(tiny_stack_dir, plain, "cache.prompts=true"), dataset, on_gpu=False)
    with pytest.raises(CacheError, match='prompts.quantize: cache null, config "int8"'):
        open_cache(cfg_for(tiny_stack_dir, with_prompts, "cache.prompts=true", "model.quantize.text_encoder=int8"),
                   dataset, on_gpu=False)
    without = open_cache(cfg_for(tiny_stack_dir, with_prompts), dataset, on_gpu=False)
    assert "prompt_embeds" not in without[0] and "latent_mean" in without[0]
    item = open_cache(cfg_for(tiny_stack_dir, with_prompts, "cache.prompts=true"), dataset, on_gpu=False)[0]
    assert item["prompt_embeds"].shape == (32, 64) and item["prompt_pooled"].shape == (64,)


def test_malformed_records_skipped_and_counted(tiny_stack_dir, tmp_path):
    data = tmp_path / "data"
    jsonl = write_jsonl(SyntheticLayoutDataset(6, resolution=64, seed=0), data)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (data / records[3]["image"]).write_bytes(b"this is not a PNG")  # fails only when decoded
    escape = {**records[0], "id": "escapes", "image": "../outside.png"}
    jsonl.write_text("\n".join([json.dumps(r) for r in records] + ["{not json", json.dumps(escape)]) + "\n")
    cfg = cfg_for(tiny_stack_dir, tmp_path / "c", "data=layout", f"data.path={jsonl}", "data.random_flip=0",
                  "data.val=null")  # every record in the training set (data=layout holds out a validation split)
    manifest = build_cache(cfg)
    assert manifest["skipped"] == {"undecodable_image": 1}
    assert manifest["source_skipped"] == {"invalid_json": 1, "image_path_escapes_root": 1}
    assert manifest["num_items"] == 6 and manifest["records"] == 5
    meta = read_shard_meta(tmp_path / "c" / "shard_00000.safetensors")
    assert meta["skipped"] == [{"index": 3, "id": records[3]["id"], "reason": "undecodable_image"}]
    cached = open_cache(cfg, build_dataset(cfg.data, 64, 0), on_gpu=False)
    ids = [cached[i]["id"] for i in range(len(cached))]
    assert ids == [r["id"] for i, r in enumerate(records) if i != 3], "no substitute, no duplicate"


@pytest.mark.slow
def test_cache_command_and_training_from_it(tiny_stack_dir, tmp_path, child_env):
    """The two commands of docs/encoder_cache.md: build with `python -m gill.tools.build_encoder_cache`, train with cache.dir set."""
    page = (ROOT / "docs" / "encoder_cache.md").read_text(encoding="utf-8")
    assert "python -m gill.tools.build_encoder_cache" in page and "cache.dir" in page
    common = [f"model.pretrained_path={tiny_stack_dir}", f"cache.dir={tmp_path / 'c'}", "data.num_samples=8"]
    proc = subprocess.run([sys.executable, "-m", "gill.tools.build_encoder_cache", *common], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 8
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train_ds.py", *common, f"train.output_dir={out}", "train.max_steps=2", "train.save_every=0",
         "train.val_batches=1", "train.val_images=1", "train.val_image_steps=2"],
        cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training from the encoder cache" in (out / "train_ds.log").read_text()
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == [1, 2]
    assert any(r["split"] == "val" for r in train)


@pytest.mark.slow
def test_two_rank_build_gives_the_same_cache_and_unlisted_shards_are_adopted(tiny_stack_dir, tmp_path, child_env,
                                                                            free_port):
    """`torchrun --nproc_per_node=2 -m gill.tools.build_encoder_cache`: the ranks split the shards, rank 0 writes the
    manifest, and the cache is byte for byte the one a single process builds. A shard on disk that the
    manifest does not list (a kill between its rename and the manifest) is listed, not rebuilt."""
    common = [f"model.pretrained_path={tiny_stack_dir}", "data.num_samples=10", "cache.shard_size=2",
              "cache.batch_size=2"]
    for name, launcher in (("one", [sys.executable, "-m", "gill.tools.build_encoder_cache"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    f"--master_port={free_port}", "-m", "gill.tools.build_encoder_cache"])):
        proc = subprocess.run([*launcher, *common, f"cache.dir={tmp_path / name}"], cwd=ROOT, env=child_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 10  # printed once, by rank 0
    one, two = read_cache(tmp_path / "one"), read_cache(tmp_path / "two")
    assert one["manifest"] == two["manifest"] and one["manifest"]["complete"]
    assert set(one) == set(two) and len(one) == 1 + 5
    for name in one:
        if name != "manifest":
            assert one[name][1] == two[name][1]
            for k, t in one[name][0].items():
                assert torch.equal(t, two[name][0][k]), (name, k)

    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    del manifest["shards"]["shard_00003.safetensors"]
    manifest["complete"] = False
    (tmp_path / "two" / MANIFEST).write_text(json.dumps(manifest))
    rebuilt = []
    again = build_cache(cfg_for(tiny_stack_dir, tmp_path / "two", *common[1:]), after_shard=rebuilt.append)
    assert rebuilt == [] and again == one["manifest"]
