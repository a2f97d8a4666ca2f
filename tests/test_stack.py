"""The frozen stack: tiny round trip through from_pretrained, kolors_random sizes, clear errors."""
import logging
import os
import shutil

import pytest
import torch

from gill.models.stack import (
    KolorsStack,
    build_random_modules,
    count_parameters,
    ensure_tiny_stack,
    load_stack,
    parameter_table,
)
from gill.models.tiny_stack import TINY_CHATGLM_CONFIG, build_tiny_chatglm

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder")


def test_tiny_layout(tiny_stack_dir):
    import json

    for sub in SUBFOLDERS:
        assert os.path.isdir(os.path.join(tiny_stack_dir, sub)), sub
    assert os.path.isfile(os.path.join(tiny_stack_dir, "tokenizer", "tokenizer.model"))
    assert os.path.isfile(os.path.join(tiny_stack_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(tiny_stack_dir, "text_encoder", "model.safetensors"))
    assert os.path.isfile(os.path.join(tiny_stack_dir, "image_encoder", "preprocessor_config.json"))
    idx = json.load(open(os.path.join(tiny_stack_dir, "model_index.json")))
    assert idx["_class_name"] == "KolorsPipeline"
    assert idx["text_encoder"] == ["kolors", "ChatGLMModel"]
    assert idx["force_zeros_for_empty_prompt"] is False


def test_tiny_cache_reused(tiny_stack_dir):
    # Second call finds the complete directory and does not rebuild (same path, same files).
    mtime = os.path.getmtime(os.path.join(tiny_stack_dir, "model_index.json"))
    assert ensure_tiny_stack(tiny_stack_dir) == tiny_stack_dir
    assert os.path.getmtime(os.path.join(tiny_stack_dir, "model_index.json")) == mtime
    leftovers = [d for d in os.listdir(os.path.dirname(tiny_stack_dir)) if ".tmp-" in d]
    assert leftovers == []


def test_tiny_frozen(tiny_stack):
    assert isinstance(tiny_stack, KolorsStack)
    mods = tiny_stack.modules()
    assert set(mods) == {"unet", "vae", "text_encoder", "vision"}
    for name, m in mods.items():
        assert not m.training, name
        assert all(not p.requires_grad for p in m.parameters()), name
        assert all(p.dtype == torch.float32 for p in m.parameters()), name
    assert tiny_stack.vae.config.scaling_factor == pytest.approx(0.13025)
    sch = tiny_stack.noise_scheduler
    assert type(sch).__name__ == "DDPMScheduler"
    assert sch.config.num_train_timesteps == 1100
    assert sch.config.prediction_type == "epsilon"
    assert float(sch.betas[-1]) == pytest.approx(0.014, rel=1e-4)


def test_tokenizer_roundtrip_and_left_padding(tiny_stack):
    tok = tiny_stack.tokenizer
    for text in ("一只橘猫趴在沙发上", "白色背景上有一个红色圆形和一个蓝色正方形", "左上是一个绿色三角形，右下是一个黄色菱形。"):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) < len(text)  # real merges, not one token per byte
        assert tok.decode(ids) == text
    # Unseen characters go through byte fallback and still round-trip.
    ids = tok.encode("龘", add_special_tokens=False)
    assert tok.decode(ids) == "龘"
    assert max(tok.encode("龘 hello 一只猫")) < tiny_stack.text_encoder.config.padded_vocab_size

    enc = tok(["一只橘猫趴在沙发上", "猫"], padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert tok.padding_side == "left"
    assert enc.input_ids.shape == (2, 12)
    assert enc.attention_mask[:, -1].all() and not enc.attention_mask[:, 0].any()  # pads on the left
    assert (enc.input_ids[enc.attention_mask == 0] == tok.pad_token_id).all()
    prefix = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    n = int(enc.attention_mask[1].sum())
    assert enc.input_ids[1, -n:-n + 2].tolist() == prefix


def test_chatglm_roundtrip(tiny_stack):
    te = tiny_stack.text_encoder
    assert hasattr(te, "output_layer")
    assert te.config.original_rope is True
    assert te.config.padded_vocab_size % 64 == 0
    assert te.config.padded_vocab_size >= tiny_stack.tokenizer.vocab_size
    ref = build_tiny_chatglm(te.config.padded_vocab_size)  # the in-memory model that was saved
    enc = tiny_stack.tokenizer(["一只橘猫趴在沙发上", "左上是一个绿色三角形"], padding="max_length",
                               max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = te(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 position_ids=enc.position_ids, output_hidden_states=True)
        out_ref = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      position_ids=enc.position_ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == TINY_CHATGLM_CONFIG["num_layers"] + 1
    assert hs[-2].shape == (16, 2, 64)  # sequence-first inside: [S, B, H]
    for a, b in zip(hs, out_ref.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(out.last_hidden_state, out_ref.last_hidden_state)
    assert torch.isfinite(out.last_hidden_state).all()
    # The saved weights are not garbage: RMSNorm weights are exactly 1.
    assert torch.equal(te.encoder.final_layernorm.weight, torch.ones(64))


def test_unet_forward_depends_on_text(tiny_stack):
    unet = tiny_stack.unet
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    ehs = torch.randn(2, 7, cfg.encoder_hid_dim, generator=g)
    cond = {"text_embeds": torch.randn(2, cfg.encoder_hid_dim, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        y = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
        y2 = unet(x, t, encoder_hidden_states=ehs * -1.0 + 0.5, added_cond_kwargs=cond).sample
        y3 = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs={**cond, "text_embeds": cond["text_embeds"] + 1}).sample
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y - y2).abs().max() > 1e-4
    assert (y - y3).abs().max() > 1e-4


def test_vae_and_vision(tiny_stack):
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lat = tiny_stack.vae.encode(img).latent_dist.mean
        assert lat.shape == (1, 4, 16, 16)
        assert tiny_stack.vae.decode(lat).sample.shape == (1, 3, 64, 64)
    from PIL import Image

    pix = tiny_stack.image_processor(images=Image.new("RGB", (48, 40), (200, 10, 10)), return_tensors="pt").pixel_values
    assert pix.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert tiny_stack.vision(pixel_values=pix).image_embeds.shape == (1, 32)


def test_kolors_random_parameter_counts_meta():
    mods = build_random_modules("meta", torch.bfloat16)
    n_unet = count_parameters(mods["unet"])
    n_glm = count_parameters(mods["text_encoder"])
    assert abs(n_unet - 2.58e9) / 2.58e9 < 0.02
    assert abs(n_glm - 6.24e9) / 6.24e9 < 0.02
    assert mods["text_encoder"].config.original_rope is True
    assert mods["unet"].config.projection_class_embeddings_input_dim == 5632
    assert mods["vae"].config.scaling_factor == pytest.approx(0.13025)
    assert mods["vision"].config.projection_dim == 768
    table = parameter_table([(k, count_parameters(m)) for k, m in mods.items()])
    assert table.startswith("| component") and "text_encoder" in table and "total" in table


def test_kolors_missing_subfolder_is_clear(tiny_stack_dir, tmp_path):
    broken = tmp_path / "kolors"
    shutil.copytree(tiny_stack_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    cfg = {"name": "kolors", "pretrained_path": str(broken), "vision_path": str(broken / "image_encoder")}
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_stack(cfg)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_stack({**cfg, "pretrained_path": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="vision"):
        load_stack({**cfg, "pretrained_path": tiny_stack_dir, "vision_path": str(tmp_path / "noclip")})


def test_kolors_loads_tiny_dir_like_real(tiny_stack_dir):
    # `kolors` with a pointed-at directory runs the same from_pretrained path as tiny.
    stack = load_stack({"name": "kolors", "pretrained_path": tiny_stack_dir,
                        "vision_path": os.path.join(tiny_stack_dir, "image_encoder"), "dtype": "bf16"})
    assert stack.unet.dtype == torch.bfloat16 and stack.text_encoder.dtype == torch.bfloat16
    assert stack.path == tiny_stack_dir


def test_plain_named_dir_loads_with_the_fp16_variant_requested(tiny_stack_dir, tiny_stack, caplog):
    # model=kolors asks for fp16 files; a directory with plain names (e.g. saved by save_pretrained) loads as is.
    cfg = {"name": "kolors", "pretrained_path": tiny_stack_dir, "variant": "fp16", "dtype": "fp32",
           "vision_path": os.path.join(tiny_stack_dir, "image_encoder")}
    with caplog.at_level(logging.INFO, logger="gill.models.stack"):
        stack = load_stack(cfg)
    for line in ("unet: diffusion_pytorch_model.safetensors", "vae: diffusion_pytorch_model.safetensors",
                 "text_encoder: model.safetensors", "vision: model.safetensors"):
        assert line + " (" in caplog.text, line
    for name, module in stack.modules().items():
        ref = dict(tiny_stack.modules()[name].named_parameters())
        assert all(torch.equal(p, ref[k]) for k, p in module.named_parameters()), name


def test_dir_without_weight_files_is_clear(tiny_stack_dir, tmp_path):
    broken = tmp_path / "kolors"
    shutil.copytree(tiny_stack_dir, broken)
    cfg = {"name": "kolors", "pretrained_path": str(broken), "vision_path": str(broken / "image_encoder"),
           "variant": "fp16"}
    (broken / "text_encoder" / "model.safetensors").rename(broken / "text_encoder" / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"text_encoder: no weight file in .*text_encoder'.*looked for "
                                                r"\['model.fp16.safetensors', 'model.safetensors.index.fp16.json', "
                                                r"'model.safetensors', 'model.safetensors.index.json'\], found "
                                                r"\['config.json', .*'weights.safetensors'\]$"):
        load_stack(cfg)
    (broken / "text_encoder" / "weights.safetensors").rename(broken / "text_encoder" / "model.safetensors")
    (broken / "image_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vision: no weight file .*'pytorch_model.bin'"):
        load_stack(cfg)


def test_run_chatglm_matches_chatglm_on_its_own_tokens(tiny_stack):
    """run_chatglm pads varying lengths to a multiple of 8 on the left and always passes the full mask (one
    compiled graph per layer): every real token's output must be what ChatGLM gives the tokenizer's own ids;
    Kolors' prompt encoding (fixed length, pads included in the conditioning) must be unchanged."""
    from gill.models.chatglm import SEQ_MULTIPLE, embed_tokens, encode_prompt, run_chatglm, tokenize

    te, tok = tiny_stack.text_encoder, tiny_stack.tokenizer

    def reference(texts, **kw):
        enc = tok(texts, truncation=True, return_tensors="pt", **kw)
        with torch.no_grad():
            out = te(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                     output_hidden_states=True)
        return enc, out

    for texts in (["一只橘猫趴在沙发上", "猫"], ["猫"]):  # a padded batch, and one row with no padding at all
        ids, mask = tokenize(tok, texts, max_length=64)
        assert ids.shape[1] % SEQ_MULTIPLE  # not aligned: run_chatglm must pad
        enc, ref = reference(texts, padding="longest", max_length=64)
        with torch.no_grad():
            last, hs = run_chatglm(te, embed_tokens(te, ids), mask, output_hidden_states=True)
        real = mask.bool()
        torch.testing.assert_close(last[real], ref.last_hidden_state.transpose(0, 1)[real], rtol=1e-5, atol=1e-5)
        assert len(hs) == len(ref.hidden_states)
        for a, b in zip(hs, ref.hidden_states):
            assert a.shape == b.shape
            torch.testing.assert_close(a.transpose(0, 1)[real], b.transpose(0, 1)[real], rtol=1e-5, atol=1e-5)

    texts = ["一只橘猫趴在沙发上", "猫"]
    enc, ref = reference(texts, padding="max_length", max_length=13)
    embeds, pooled = encode_prompt(te, tok, texts, 13)
    torch.testing.assert_close(embeds, ref.hidden_states[-2].transpose(0, 1), rtol=1e-5, atol=1e-5)  # pads too
    torch.testing.assert_close(pooled, ref.hidden_states[-1][-1], rtol=1e-5, atol=1e-5)
