"""Inference API on the tiny stack (CPU): artifact round trip, layout generation, captioning,
retrieval, overlay and the CLI.

One random adapter is exported through the artifact contract and loaded back with
``load_trained``; every other test uses that loaded model, so a broken loader fails everything.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from gill.inference import captioning
from gill.inference.layout_pipeline import generate_layout
from gill.inference.loading import load_trained, read_metadata, save_adapter
from gill.inference.overlay import PALETTE, cjk_font_path, draw_layout
from gill.inference.retrieval import RetrievalIndex, list_images

REPO = Path(__file__).resolve().parents[1]
OBJECTS = [("红色圆形", (0.1, 0.1, 0.5, 0.5)), ("蓝色方块", (0.5, 0.4, 0.9, 0.9))]
PROMPT = "一个红色圆形和一个蓝色方块"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core box a second OpenMP thread that
    gets descheduled stalls every op at the barrier (measured: 20-60x slower under contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_cfg():
    return OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")


@pytest.fixture(scope="module")
def artifact(tiny_stack, tmp_path_factory):
    """(path, source adapter state): a random adapter with nonzero gates, saved per the contract."""
    from gill.models.model import GillModel

    cfg = _tiny_cfg()
    model = GillModel(tiny_stack, cfg)
    model.adapter.spatial.detach()  # the stack fixture is shared with other tests: leave its UNet unhooked
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in model.adapter.spatial.layers:
            layer.gate.fill_(0.5)  # nonzero: the layout must change the image
    path = tmp_path_factory.mktemp("run") / "adapter.safetensors"
    full = {"model": OmegaConf.to_container(cfg, resolve=True), "train": {"output_dir": str(path.parent)}}
    # exactly the trainer's contract
    save_file(
        {k: v.float() for k, v in model.adapter.state_dict().items()},
        str(path),
        metadata={"config": json.dumps(full), "format": "gill-adapter-v1", "step": "7"},
    )
    return path, {k: v.clone() for k, v in model.adapter.state_dict().items()}


@pytest.fixture(scope="module")
def model(artifact, tiny_stack_dir):
    return load_trained(artifact[0], {"pretrained_path": tiny_stack_dir}, device="cpu", dtype="fp32")


# ---- loading -------------------------------------------------------------------------------------
def test_round_trip_exact_and_pickle_free(artifact, tiny_stack_dir, monkeypatch):
    path, source = artifact

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading an adapter")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    loaded = load_trained(path, {"model.pretrained_path": tiny_stack_dir}, device="cpu", dtype="fp32")
    state = loaded.adapter.state_dict()
    assert state.keys() == source.keys()
    for k in source:
        assert torch.equal(state[k], source[k]), k
    assert read_metadata(path)["step"] == "7"
    assert loaded.unet.config.sample_size == 16  # the stack came from the stored model config
    assert not loaded.training


def test_strict_loading_names_bad_keys(artifact, tiny_stack_dir, tmp_path):
    path, _ = artifact
    state, meta = load_file(str(path)), read_metadata(path)
    missing = next(iter(state))
    del state[missing]
    state["stray.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(RuntimeError) as e:
        load_trained(bad, {"pretrained_path": tiny_stack_dir}, device="cpu", dtype="fp32")
    assert missing in str(e.value) and "stray.weight" in str(e.value)

    other = tmp_path / "other.safetensors"
    save_file(state, str(other), metadata={**meta, "format": "something-else"})
    with pytest.raises(ValueError, match="gill-adapter-v1"):
        read_metadata(other)


def test_save_adapter_helper_matches_contract(model, tmp_path):
    cfg = {"model": {"name": "tiny"}}
    save_adapter(model.adapter, tmp_path / "a.safetensors", cfg, step=3)
    meta = read_metadata(tmp_path / "a.safetensors")
    assert json.loads(meta["config"]) == cfg and meta["step"] == "3"


# ---- layout generation ---------------------------------------------------------------------------
def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_generate_size_and_determinism(model, monkeypatch):
    import diffusers.pipelines.kolors.pipeline_kolors as kolors_pipeline

    noise = []  # the initial latents each call draws (the only random input of the sampler)
    draw = kolors_pipeline.randn_tensor
    monkeypatch.setattr(kolors_pipeline, "randn_tensor", lambda *a, **k: noise.append(draw(*a, **k)) or noise[-1])
    a = generate_layout(model, PROMPT, OBJECTS, steps=2, seed=1, num_images=2, height=48, width=64)
    b = generate_layout(model, PROMPT, OBJECTS, steps=2, seed=1, num_images=2, height=48, width=64)
    assert [im.size for im in a] == [(64, 48), (64, 48)]
    # The same call twice is the same computation: bit-identical.
    assert all(np.array_equal(_arr(x), _arr(y)) for x, y in zip(a, b))
    assert [im.info["seed"] for im in a] == [1, 2]
    # Image i uses seed + i: the second image alone, with seed 2, starts from exactly the same noise ...
    (c,) = generate_layout(model, PROMPT, OBJECTS, steps=2, seed=2, height=48, width=64)
    assert c.info["seed"] == 2 and torch.equal(noise[2][0], noise[0][1]) and not torch.equal(noise[0][0], noise[0][1])
    # ... and gives the same image up to floating point: a batch of 1 and a batch of 2 run different CPU
    # kernels (by processor and thread count), which moves a pixel across a rounding boundary now and then.
    # A wrong seed or a leak between the images of a batch changes most pixels by many levels.
    diff = np.abs(_arr(c) - _arr(a[1]))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(_arr(a[0]) - _arr(a[1])).mean() > 10 * max(diff.mean(), 0.01)  # the tolerance can fail
    (d,) = generate_layout(model, PROMPT, OBJECTS, steps=1)  # default size: sample_size * vae factor
    assert d.size == (64, 64)


def test_layout_changes_output_only_when_on(model):
    kw = dict(steps=2, seed=0)
    plain = _arr(generate_layout(model, PROMPT, [], **kw)[0])
    off = _arr(generate_layout(model, PROMPT, OBJECTS, beta=0.0, **kw)[0])
    on = _arr(generate_layout(model, PROMPT, OBJECTS, beta=1.0, **kw)[0])
    assert np.array_equal(off, plain)
    assert np.abs(on - plain).max() > 0
    # pixel boxes go through normalize_bbox: the same layout in pixels of the 64x64 output
    px = [(lab, [v * 64 for v in box]) for lab, box in OBJECTS]
    assert np.array_equal(_arr(generate_layout(model, PROMPT, px, beta=1.0, box_unit="pixel", **kw)[0]), on)


def _record_unet_calls(model):
    """UNet pre-hook: per call, (encoder_hidden_states, layout mask or None)."""
    calls = []

    def hook(module, args, kwargs):
        state = model.adapter.spatial._state
        calls.append((kwargs["encoder_hidden_states"].clone(), state["mask"].clone() if state else None))

    return calls, model.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_cfg_halves_get_null_and_real_layout(model):
    calls, handle = _record_unet_calls(model)
    try:
        generate_layout(model, PROMPT, OBJECTS, steps=4, beta=0.5, seed=0, num_images=2)
    finally:
        handle.remove()
    assert len(calls) == 4
    neg, _ = model.empty_prompt()
    pos, _ = model.prompt_encoding([PROMPT])
    for i, (ehs, mask) in enumerate(calls):
        assert ehs.shape[0] == 4  # 2 images, doubled for guidance
        # KolorsPipeline orders the doubled batch [negative, positive] ...
        assert torch.allclose(ehs[:2], neg.expand(2, -1, -1)) and torch.allclose(ehs[2:], pos.expand(2, -1, -1))
        if i < 2:  # ... so the null layout goes with the negative rows; beta=0.5 of 4 steps = 2 steps on
            assert mask.shape == (4, len(OBJECTS))
            assert not mask[:2].any() and mask[2:].all()
        else:
            assert mask is None
    assert model.adapter.spatial._state == {}


def test_no_guidance_sets_layout_for_single_batch(model):
    calls, handle = _record_unet_calls(model)
    try:
        generate_layout(model, PROMPT, OBJECTS, steps=2, beta=1.0, seed=0, guidance_scale=1.0, use_mapper=True)
    finally:
        handle.remove()
    from gill.models.modes import img_token_hidden

    with torch.no_grad():
        mapped, _ = model.adapter.map_to_conditioning(img_token_hidden(model, [PROMPT]))
    assert len(calls) == 2
    for ehs, mask in calls:
        assert ehs.shape[0] == 1 and mask is not None and mask.all()
        assert torch.allclose(ehs, mapped)  # use_mapper: the UNet is driven by the LLM


# ---- captioning ----------------------------------------------------------------------------------
def _images():
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]


def test_caption_strings_and_greedy_deterministic(model):
    a = captioning.caption(model, _images(), max_new_tokens=6)
    b = captioning.caption(model, _images(), max_new_tokens=6)
    assert len(a) == 3 and all(isinstance(s, str) for s in a) and a == b
    feats = model.vision_features({"images": _images()})
    assert captioning.caption(model, feats, max_new_tokens=6) == a  # precomputed features path
    beams = captioning.caption(model, _images(), max_new_tokens=6, num_beams=3)
    assert len(beams) == 3 and all(isinstance(s, str) for s in beams)
    assert captioning.caption(model, []) == []


def test_caption_stops_at_eos(model, monkeypatch):
    """Force the LM to say tokens 10, 11, then eos: greedy and beam must both stop there."""
    eos = model.tokenizer.eos_token_id
    script = [10, 11, eos]
    real = captioning.lm_logits

    def scripted(text_encoder, hidden):
        step = scripted.step
        scripted.step += 1
        logits = torch.zeros(*hidden.shape[:-1], real(text_encoder, hidden).shape[-1])
        logits[..., script[min(step, 2)]] = 10.0
        return logits

    scripted.step = 0
    monkeypatch.setattr(captioning, "lm_logits", scripted)
    expected = model.tokenizer.decode([10, 11]).strip()
    assert captioning.greedy_caption(model, _images()[:2], max_new_tokens=8) == [expected] * 2
    assert scripted.step == 3
    scripted.step = 0
    assert captioning.beam_caption(model, _images()[:1], num_beams=2, max_new_tokens=8) == [expected]


# ---- retrieval -----------------------------------------------------------------------------------
def test_retrieval_index_round_trip_and_known_ranking(model, tmp_path):
    from gill.models.modes import img_token_hidden

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    ims = _images()
    names = [folder / "a.png", folder / "sub" / "b.jpg", folder / "c.png"]
    for im, p in zip(ims, names):
        im.save(p)
    (folder / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside.png"
    ims[0].save(outside)
    (folder / "escape.png").symlink_to(outside)  # resolves outside the folder: must not be indexed
    assert list_images(folder) == sorted(str(p) for p in names)

    texts = ["绿色菱形", "红色圆形", "蓝色方块"]  # text j describes image perm[j]
    perm = [2, 0, 1]
    adapter = model.adapter
    saved = {k: v.clone() for k, v in adapter.state_dict().items()}
    try:
        with torch.no_grad():
            # Projections chosen so image i -> e_i and text j -> e_perm[j] (pseudo-inverse of the
            # features); the right match then has cosine 1 and every other pair 0.
            d = adapter.image_proj.out_features
            feats = model.vision_features({"images": ims}).float()
            hid = img_token_hidden(model, texts)  # the text side reads the first [IMG] (GILL) or all r
            hid = (hid[:, 0] if adapter.retrieval_embedding == "first" else hid.mean(dim=1)).float()
            target_img = torch.eye(3, d)
            target_txt = torch.eye(3, d)[perm]
            adapter.image_proj.weight.copy_((torch.linalg.pinv(feats) @ target_img).T)
            adapter.image_proj.bias.zero_()
            adapter.text_proj.weight.copy_((torch.linalg.pinv(hid) @ target_txt).T)
            adapter.text_proj.bias.zero_()

        index = RetrievalIndex.build(model, folder, batch_size=2)
        index.save(tmp_path / "index")
        loaded = RetrievalIndex.load(tmp_path / "index")
        assert loaded.paths == index.paths and torch.equal(loaded.embeddings, index.embeddings)

        assert loaded.paths == sorted(str(p) for p in names)
        hits = loaded.query_text(model, texts, k=2)
        for j, row in enumerate(hits):
            assert row[0][0] == str(names[perm[j]]) and row[0][1] > 0.99 and abs(row[1][1]) < 0.05
        assert loaded.query_text(model, texts[0], k=1)[0][0] == str(names[perm[0]])

        for i, im in enumerate(ims):
            top = RetrievalIndex.query_image(model, im, texts, k=3)
            assert top[0][0] == texts[perm.index(i)] and len(top) == 3
    finally:
        adapter.load_state_dict(saved)


# ---- overlay -------------------------------------------------------------------------------------
def test_overlay_draws_boxes_and_labels():
    base = Image.new("RGB", (100, 100), (0, 0, 0))
    out = draw_layout(base, [("橘猫", (0.2, 0.2, 0.8, 0.8)), ("沙发", (0.0, 0.5, 1.0, 1.0))], line_width=2)
    assert base.getpixel((50, 79)) == (0, 0, 0)  # the input is not drawn on
    assert out.getpixel((50, 79)) == PALETTE[0]  # bottom edge of box 0
    assert out.getpixel((21, 40)) == PALETTE[0]  # left edge of box 0
    assert out.getpixel((98, 75)) == PALETTE[1]  # right edge of box 1
    assert out.getpixel((50, 40)) == (0, 0, 0)  # inside, away from the label
    label = np.asarray(out.crop((22, 22, 45, 40)))
    assert (label.min(axis=-1) > 200).any()  # (antialiased) white label text on the colour tab


def test_overlay_cjk_font_renders_distinct_glyphs():
    assert cjk_font_path() is not None, "pylopdf-fonts-zh-cn is an install requirement"
    a = np.asarray(draw_layout(Image.new("RGB", (96, 96)), [("橘", (0, 0, 1, 1))]))
    b = np.asarray(draw_layout(Image.new("RGB", (96, 96)), [("猫", (0, 0, 1, 1))]))
    assert not np.array_equal(a, b)  # tofu boxes would be identical


def test_overlay_falls_back_without_font(monkeypatch):
    from gill.inference import overlay

    monkeypatch.setattr(overlay, "cjk_font_path", lambda: None)
    overlay.load_font.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CJK font"):
            out = overlay.draw_layout(Image.new("RGB", (64, 64)), [("猫", (0.1, 0.1, 0.9, 0.9))], font_size=13)
        assert out.getpixel((32, 57)) == PALETTE[0]
    finally:
        overlay.load_font.cache_clear()


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_generate_caption_retrieve(model, tmp_path, monkeypatch, capsys):
    from gill.inference import __main__ as cli

    seen = {}

    def fake_load(args):
        seen["overrides"] = cli.parse_overrides(args.set)
        return model

    monkeypatch.setattr(cli, "_load", fake_load)
    out = tmp_path / "gen"
    assert cli.main([
        "generate", "--adapter", "x.safetensors", "--set", "pretrained_path=/data/kolors", "--set",
        "adapter.spatial.box_mask=false", "--prompt", PROMPT, "--object", "红色圆形:100,100,500,500",
        "--object", "蓝色方块：500,400,900,900", "--box-unit", "1000", "--steps", "2", "--seed", "5", "--out", str(out),
    ]) == 0
    assert seen["overrides"] == {"pretrained_path": "/data/kolors", "adapter.spatial.box_mask": False}
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert rec["seed"] == 5 and rec["objects"][1] == {"label": "蓝色方块", "bbox": [0.5, 0.4, 0.9, 0.9]}
    assert Image.open(rec["image"]).size == (64, 64) and Path(rec["overlay"]).is_file()
    assert json.loads(Image.open(rec["image"]).text["gill"])["prompt"] == PROMPT

    img = tmp_path / "red.png"
    _images()[0].save(img)
    assert cli.main(["caption", "--adapter", "x", str(img), "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(img)

    assert cli.main(["retrieve", "build", "--adapter", "x", "--images", str(tmp_path), "--index", str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    assert cli.main(["retrieve", "text", "--adapter", "x", "--index", str(tmp_path / "ix"), "红色", "-k", "1"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["text"] == "红色" and len(hit["hits"]) == 1
    assert cli.main(["retrieve", "image", "--adapter", "x", str(img), "--captions", "红色", "蓝色"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 2
