"""The captioning loss teaches next-token prediction: trained on four captions, the greedy captioner of the
inference path writes them back. An off-by-one in the label shift trains the model to echo the current
token instead, which the teacher-forced accuracy does not reveal but generation does.

The tiny ChatGLM is random, so four prefix embeddings alone cannot steer it; the test lets it train
along with the visual prefix (the loss's alignment is what is under test, not the frozen setup)."""
import torch

from gill.models import modes
from gill.data.collate import collate_layout
from gill.data.synthetic import SyntheticLayoutDataset
from gill.inference.captioning import caption
from gill.models.model import GillModel


def token_accuracy(tokenizer, refs: list[str], hyps: list[str]) -> float:
    """Share of reference tokens (and their end) that the hypothesis has at the same position."""
    hit = total = 0
    for ref, hyp in zip(refs, hyps):
        r = tokenizer.encode(ref, add_special_tokens=False) + [None]  # None: "ends here"
        h = tokenizer.encode(hyp, add_special_tokens=False) + [None]
        hit += sum(a == b for a, b in zip(r, h))
        total += len(r)
    return hit / total


def test_captioning_overfits_four_captions_and_generates_them(tiny_stack):
    torch.manual_seed(0)
    model = GillModel(tiny_stack, _model_cfg())
    frozen = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}  # the stack is shared
    try:
        ds = SyntheticLayoutDataset(16, resolution=64, seed=0)
        items, seen = [], set()
        for i in range(len(ds)):
            if ds[i]["caption"] not in seen and len(items) < 4:
                seen.add(ds[i]["caption"])
                items.append(ds[i])
        batch = collate_layout(items)
        model.text_encoder.requires_grad_(True)
        params = [*model.adapter.visual_prefix.parameters(), *model.text_encoder.parameters()]
        opt = torch.optim.Adam(params, lr=3e-3)
        for _ in range(300):
            out = modes.captioning(model, batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        assert float(out["token_acc"]) >= 0.9
        model.eval()
        with torch.no_grad():
            hyps = caption(model, batch["images"])
        acc = token_accuracy(model.tokenizer, batch["captions"], hyps)
        assert acc >= 0.9, (acc, list(zip(batch["captions"], hyps)))
    finally:
        model.text_encoder.load_state_dict(frozen)
        model.text_encoder.requires_grad_(False)
        model.adapter.spatial.detach()


def _model_cfg():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        return compose("config").model
