"""What makes the adapter GILL: [IMG] output rows and the LM loss that teaches the LM to emit [IMG0],
first-position retrieval embeddings, the mapper reading hidden states + [IMG] embeddings, [IMG] input
rows at the vocabulary's mean norm, and inference in which the model decides when to show an image."""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from gill.models import modes
from gill.data.collate import collate_layout
from gill.data.synthetic import SyntheticLayoutDataset
from gill.inference.interleaved import continue_prompt, generate_for_text, img_emission
from gill.inference.loading import load_trained, save_adapter
from gill.inference.retrieval import RetrievalIndex
from conftest import ROOT, tiny_model

sys.path.insert(0, str(ROOT / "benchmarks"))


def make_model(stack_dir, **overrides):
    model, cfg = tiny_model(stack_dir, **overrides)
    model.adapter.spatial.detach()  # these tests never run the UNet's layout path
    return model, cfg


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticLayoutDataset(8, resolution=64, seed=5)
    return collate_layout([ds[i] for i in range(8)])


def record_targets(monkeypatch):
    seen = []
    real = modes.next_token_loss

    def spy(model, hidden, labels):
        out = real(model, hidden, labels)
        seen.append(out[2].tolist())
        return out

    monkeypatch.setattr(modes, "next_token_loss", spy)
    return seen


def test_output_rows_extend_the_frozen_head(tiny_stack_dir):
    model, _ = make_model(tiny_stack_dir)
    r, h = model.adapter.num_img, model.llm_dim
    assert model.adapter.img_output.shape == (r, h)
    assert model.text_encoder.output_layer.out_features == model.text_encoder.config.padded_vocab_size  # not resized
    with torch.no_grad():
        model.adapter.img_output.normal_()
    hidden = torch.randn(3, h)
    logits = modes.full_logits(model, hidden)
    v = model.text_encoder.output_layer.out_features
    assert logits.shape == (3, v + r)
    torch.testing.assert_close(logits[:, :v], model.text_encoder.output_layer(hidden))
    torch.testing.assert_close(logits[:, v:], hidden @ model.adapter.img_output.T)


def test_img0_target_in_retrieval_and_generation_not_in_captioning(tiny_stack_dir, batch, monkeypatch):
    model, _ = make_model(tiny_stack_dir)
    v, r, b = model.text_encoder.output_layer.out_features, model.adapter.num_img, len(batch["captions"])
    seen = record_targets(monkeypatch)
    for mode in ("captioning", "retrieval", "generation"):
        seen.clear()
        out = model(batch, mode)
        (targets,) = seen
        img = [t for t in targets if t >= v]
        if mode == "captioning":
            assert img == [] and "lm_loss" not in out
        else:
            # GILL: the caption tokens and [IMG0] carry labels, [IMG1..r-1] do not
            assert img == [v] * b, (mode, img)
            assert len(targets) == b + sum(len(modes._caption_ids(model, c)) for c in batch["captions"])
            assert out["lm_loss"] > 0 and set(range(v + 1, v + r)).isdisjoint(targets)


def test_lm_loss_is_weighted_into_the_mode_loss(tiny_stack_dir, batch):
    model, _ = make_model(tiny_stack_dir)
    assert model.lm_loss_weight == 0.5  # GILL: ce_loss * ret_loss_scale * 0.5
    out = model(batch, "retrieval")
    torch.testing.assert_close(out["loss"], out["contrastive_loss"] + 0.5 * out["lm_loss"])
    model.seed(1)
    gen = model(batch, "generation")
    full = gen["mapper_loss"] + gen["diffusion_loss"] + 0.5 * gen["lm_loss"]
    torch.testing.assert_close(gen["loss"].detach(), full)


@pytest.mark.parametrize("how", ["first", "mean"])
def test_retrieval_embedding_position(tiny_stack_dir, batch, how):
    """``first`` (GILL) reads the first [IMG] position: under causal attention it cannot depend on
    the later [IMG] rows, so they get no retrieval gradient; ``mean`` reads all r."""
    model, _ = make_model(tiny_stack_dir, **{"adapter.retrieval_embedding": how})
    caps = batch["captions"]
    hidden = modes.img_token_hidden(model, caps)
    proj = model.adapter.text_proj(hidden)
    expect = proj[:, 0] if how == "first" else proj.mean(dim=1)
    torch.testing.assert_close(modes.text_embedding(model, caps), expect)
    model(batch, "retrieval")["loss"].backward()
    later = model.adapter.img_tokens.grad[1:].abs().sum()
    assert (later == 0) if how == "first" else (later > 0)


def test_img_rows_are_renormalised_to_the_vocabulary_mean_norm(tiny_stack_dir, batch):
    model, _ = make_model(tiny_stack_dir)
    vocab = model.text_encoder.embedding.word_embeddings.weight.norm(dim=-1).mean()
    norms = model.adapter.img_embeds().norm(dim=-1)
    torch.testing.assert_close(norms, vocab.expand_as(norms))
    before = modes.img_token_hidden(model, batch["captions"])
    with torch.no_grad():
        model.adapter.img_tokens.mul_(7.0)  # the scale of a row is not what the LM sees
    torch.testing.assert_close(modes.img_token_hidden(model, batch["captions"]), before)

    plain, _ = make_model(tiny_stack_dir, **{"adapter.img_norm": "none"})
    torch.testing.assert_close(plain.adapter.img_embeds(), plain.adapter.img_tokens)


@pytest.mark.parametrize("how", ["hidden_plus_embed", "hidden"])
def test_mapper_input(tiny_stack_dir, batch, monkeypatch, how):
    model, _ = make_model(tiny_stack_dir, **{"adapter.mapper_input": how})
    seen = []
    real = model.adapter.mapper.forward
    monkeypatch.setattr(model.adapter.mapper, "forward", lambda x: seen.append(x.detach()) or real(x))
    model.seed(0)
    model(batch, "generation")
    hidden = modes.img_token_hidden(model, batch["captions"])
    expect = hidden + model.adapter.img_embeds() if how == "hidden_plus_embed" else hidden
    torch.testing.assert_close(seen[0], expect.detach())


def test_flattened_adapter_keeps_the_new_rows(tiny_stack_dir, batch):
    model, _ = make_model(tiny_stack_dir)
    with torch.no_grad():
        model.adapter.img_output.normal_()
    state = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    assert "img_output" in state and "vocab_norm" not in state  # a fact of the stack, not a weight
    model.seed(0)
    ref = model(batch, "retrieval")["loss"]
    model.adapter.flatten()
    assert [n for n, p in model.adapter.named_parameters() if p.requires_grad] == ["flat"]
    flat_state = model.adapter.state_dict()
    assert set(flat_state) == set(state)
    for k in state:
        torch.testing.assert_close(flat_state[k], state[k])
    model.seed(0)
    out = model(batch, "retrieval")["loss"]
    torch.testing.assert_close(out, ref)
    out.backward()
    grads = model.adapter.flat_params.split(model.adapter.flat.grad)
    assert grads["img_output"].abs().sum() > 0


def test_lm_learns_to_emit_img_at_caption_end_and_inference_acts_on_it(tiny_stack_dir, batch, tmp_path, capsys):
    """A short training on one fixed batch: [IMG0] becomes the greedy next token at the end of its
    captions and stays rare inside them; the exported artifact loads with the rows, and the
    continuation verb retrieves when (and only when) the model emits [IMG0]."""
    model, cfg = make_model(tiny_stack_dir)
    caps = batch["captions"]
    batch = dict(batch, vision_features=model.vision_features(batch))
    before = img_emission(model, caps)
    assert before["end"] == 0.0  # zero output rows: [IMG0] never wins at init
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(batch, "retrieval")["loss"].backward()
        opt.step()
    after = img_emission(model, caps)
    assert after["end"] >= 0.75 and after["inside"] <= 0.25, after

    path = tmp_path / "adapter.safetensors"
    save_adapter(model.adapter, path, {"model": OmegaConf.to_container(cfg, resolve=True)}, step=STEPS)
    loaded = load_trained(path, {"pretrained_path": tiny_stack_dir}, device="cpu", dtype="fp32")
    torch.testing.assert_close(loaded.adapter.img_output, model.adapter.img_output)
    assert img_emission(loaded, caps) == after

    index = RetrievalIndex(torch.nn.functional.normalize(torch.randn(3, cfg.adapter.retrieval_dim), dim=-1), ["a", "b", "c"])
    def ids(text):
        return loaded.tokenizer.encode(text, add_special_tokens=False)

    # the greedy continuation of a caption is [IMG0] right away, as img_emission measured
    conts = {c: continue_prompt(loaded, c, max_new_tokens=4) for c in caps}
    ended = [c for c, o in conts.items() if o.wants_image and o.ids == ids(c) and o.text == ""]
    assert len(ended) >= 0.75 * len(caps)
    res = generate_for_text(loaded, ended[0], max_new_tokens=4, index=index, k=2)
    q = torch.nn.functional.normalize(loaded.adapter.text_embedding(modes.img_token_hidden(loaded, [ended[0]])), dim=-1)
    assert res.wants_image and res.hits == index.query_embeddings(q, 2)[0]
    gen = generate_for_text(loaded, ended[0], max_new_tokens=4, generate=True, steps=2, seed=0)
    assert gen.wants_image and len(gen.images) == 1 and gen.images[0].info["seed"] == 0
    # with [IMG0] forbidden for the first tokens, the model writes text and nothing is retrieved
    res = generate_for_text(loaded, ended[0], max_new_tokens=3, min_word_tokens=3, index=index)
    assert not res.wants_image and res.hits == [] and len(res.ids) == len(ids(ended[0])) + 3

    # the CLI verb: one JSON line per prompt
    from gill.inference.__main__ import main

    index.save(tmp_path / "index")
    capsys.readouterr()
    argv = ["chat", "--adapter", str(path), "--set", f"pretrained_path={tiny_stack_dir}", "--device", "cpu",
            "--dtype", "fp32", "--index", str(tmp_path / "index"), "--max-new-tokens", "4", ended[0]]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(line)
    assert rec["prompt"] == ended[0] and rec["image"] is True and rec["hits"][0][0] in ("a", "b", "c")


STEPS = 150


@pytest.mark.slow  # the ci stand-in (shared with the grounding benchmark test) + 1500 adapter steps
def test_img0_emission_goal_on_a_pretrained_language_model(ci_standin):
    """GILL's goal for *when* to show an image, on held-out captions, with a frozen LM that is a language
    model (the grounding benchmark's stand-in ChatGLM, pretrained on the caption language) rather than
    the random tiny one: [IMG0] is the greedy next token at >= 90% of caption ends and <= 10% of the
    positions inside captions (benchmarks/img_token_emission.py, docs/gill_fidelity.md)."""
    from img_token_emission import measure, parse_args

    args = parse_args(["--lr", "1e-1", "--stack", str(ci_standin), "--run", "standin:retrieval:1500"])
    _, _, _, _, before, res, _ = measure(args.run[0], args)
    assert before["end"] == 0.0 and before["inside"] == 0.0
    assert res["end"] >= 0.9 and res["inside"] <= 0.1 and res["n_end"] == 128, res
