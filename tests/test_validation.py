"""Validation numbers that can move: recall ranks 64 held-out pairs (scrambled retrieval heads lower it),
and the validation losses do not depend on the training dropouts or on where the random stream is."""
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from gill.models import modes
from gill.data.collate import build_dataset, collate_layout
from gill.models.model import GillModel
from gill.training.validation import evaluate

ROOT = Path(__file__).resolve().parent.parent


def test_recall_moves_with_the_heads_and_losses_hold_still(tiny_stack, tiny_stack_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model.pretrained_path={tiny_stack_dir}", "train.val_batches=1",
                                           "train.val_captions=0"])
    torch.manual_seed(0)
    model = GillModel(tiny_stack, cfg.model)
    try:
        val = build_dataset(cfg.data.val, int(cfg.train.resolution), 0)
        assert len(val) >= 64
        loader = DataLoader(val, batch_size=16, collate_fn=collate_layout)

        # Fit the retrieval heads on the held-out pairs' (frozen) features, so recall has room to fall.
        with torch.no_grad():
            batches = list(loader)[:4]
            hidden = torch.cat([modes.img_token_hidden(model, b["captions"]) for b in batches])
            vision = torch.cat([model.vision_features(b) for b in batches])
        heads = [*model.adapter.text_proj.parameters(), *model.adapter.image_proj.parameters()]
        opt = torch.optim.Adam(heads, lr=1e-2)
        for _ in range(300):
            txt = F.normalize(model.adapter.text_embedding(hidden), dim=-1)  # as the retrieval mode embeds
            img = F.normalize(model.adapter.image_proj(vision), dim=-1)
            logits = 20 * txt @ img.T
            target = torch.arange(len(txt))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        fitted, _ = evaluate(model, loader, cfg.train)

        # Same weights, the training stream elsewhere and every dropout on: the same validation losses.
        torch.rand(100, generator=model.rng)
        model.caption_dropout = model.layout_dropout = 1.0
        again, _ = evaluate(model, loader, cfg.train)
        for k in ("generation/loss", "generation/diffusion_loss", "captioning/loss"):
            assert again[k] == fitted[k], (k, again[k], fitted[k])
        assert model.caption_dropout == 1.0 and model.training  # restored after the pass
        assert fitted["retrieval/pairs"] == 64
        assert fitted["retrieval/t2i_recall@5"] >= 0.5 and fitted["retrieval/i2t_recall@5"] >= 0.5, fitted

        with torch.no_grad():  # scrambled retrieval heads
            for p in heads:
                p.copy_(torch.randn_like(p) * p.std())
        scrambled, _ = evaluate(model, loader, cfg.train)
        for k in ("retrieval/t2i_recall@5", "retrieval/i2t_recall@5"):
            assert scrambled[k] <= fitted[k] - 0.3, (k, scrambled[k], fitted[k])
    finally:
        model.adapter.spatial.detach()
