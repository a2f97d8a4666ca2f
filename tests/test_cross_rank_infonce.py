"""The retrieval loss across ranks: two gloo processes on CPU, each with half of a global batch, give
(after the data-parallel gradient average DeepSpeed does) exactly the gradient one process computes on
the whole batch — the gathered negatives are differentiated through every rank's embeddings."""
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gill.models import modes
from gill.models.adapter import GillAdapter

GLOBAL, R, H, V, D = 6, 2, 8, 5, 4  # samples, [IMG] tokens, LLM width, vision width, retrieval width


class Heads(nn.Module):
    """The adapter's retrieval heads (text/image projections, logit scale), seeded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text_proj, self.image_proj = nn.Linear(H, D), nn.Linear(V, D)
        self.logit_scale = nn.Parameter(torch.tensor([2.0]))

    retrieval_embedding = "first"
    text_embedding = GillAdapter.text_embedding  # the adapter's own [IMG] -> embedding step

    def scale(self):
        return self.logit_scale.exp()


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL, R, H, generator=g), torch.randn(GLOBAL, V, generator=g)


def loss_and_grads(rows: slice):
    """The project's retrieval loss on ``rows`` of the global batch; the heads' gradients."""
    hidden, vision = global_batch()
    heads = Heads()
    model = SimpleNamespace(adapter=heads, vision_features=lambda batch: vision[rows], lm_loss_weight=0.5)
    original = modes.img_token_forward
    # ChatGLM's [IMG] states, given; the LM loss is per rank and local (no negatives): zero here
    modes.img_token_forward = lambda model, captions, lm_loss=False: (hidden[rows], {"lm_loss": torch.zeros(())})
    try:
        out = modes.retrieval(model, {"captions": ["-"] * len(range(GLOBAL)[rows])})
    finally:
        modes.img_token_forward = original
    out["loss"].backward()
    return out, {n: p.grad for n, p in heads.named_parameters()}


def _rank(rank: int, world: int, init_file: str, results: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = GLOBAL // world
        out, grads = loss_and_grads(slice(rank * share, (rank + 1) * share))
        for g in grads.values():  # DeepSpeed's data-parallel reduction: the mean over ranks
            dist.all_reduce(g)
            g /= world
        torch.save({"grads": grads, "negatives": int(out["negatives"])}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, in which a rank aborted ("terminate called
    # without an active exception", SIGABRT) in ~4 of 10 runs after its work was done (torch 2.13, gloo on CPU).
    os._exit(0)


def test_two_rank_infonce_gradient_equals_one_rank_on_the_global_batch(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _, ref = loss_and_grads(slice(0, GLOBAL))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["negatives"] == GLOBAL - 1  # every rank's samples are negatives
        for name, g in ref.items():
            err = float((got["grads"][name] - g).abs().max() / g.abs().max())
            assert err < 1e-5, (rank, name, err)
