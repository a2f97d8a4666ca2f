"""Flattening a module's trainables into one tensor changes nothing a user can observe: outputs,
gradients (also through gradient checkpointing), state dict names and values, loading, ``.to()``."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gill.training.flat_params import FlatParameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 3, bias=False)
        self.token = nn.Parameter(torch.randn(3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x, ckpt=False):
        h = checkpoint(self.a, x, use_reentrant=False) if ckpt else self.a(x)
        return self.frozen(self.b(torch.relu(self.norm(h))) + self.token) * self.scale


@pytest.mark.parametrize("ckpt", [False, True])
def test_outputs_and_gradients_are_unchanged(ckpt):
    torch.manual_seed(0)
    ref = Net()
    flat_net = copy.deepcopy(ref)
    fp = FlatParameters(flat_net)
    assert sorted(n for n, _ in flat_net.named_parameters()) == ["flat", "frozen.bias", "frozen.weight"]
    x = torch.randn(5, 4)
    for step in range(2):  # views re-made per forward; the second graph is independent of the first
        fp.refresh()
        out_ref, out_flat = ref(x, ckpt), flat_net(x, ckpt)
        assert torch.equal(out_ref, out_flat)
        out_ref.square().sum().backward()
        out_flat.square().sum().backward()
    grads = fp.split(flat_net.flat.grad)
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-5), name
    assert flat_net.frozen.weight.grad is None


def test_state_dict_keeps_the_original_names_and_loads_both_ways():
    torch.manual_seed(0)
    ref = Net()
    flat_net = copy.deepcopy(ref)
    fp = FlatParameters(flat_net)
    sd_ref, sd_flat = ref.state_dict(), flat_net.state_dict()
    assert sorted(sd_ref) == sorted(sd_flat)
    assert all(torch.equal(sd_ref[k], sd_flat[k]) for k in sd_ref)

    other = Net()  # different random weights, flattened: load the reference's named state dict
    FlatParameters(other)
    other.load_state_dict(sd_ref)
    assert torch.equal(other.flat, flat_net.flat)
    assert torch.equal(other.a.weight, ref.a.weight)  # the views follow the loaded values

    with torch.no_grad():
        flat_net.flat.add_(1.0)
    plain = Net()
    plain.load_state_dict(flat_net.state_dict())  # a flattened module's state loads into a plain one
    assert torch.equal(plain.a.weight, ref.a.weight + 1.0)
    full = fp.expand({"flat": flat_net.flat.detach(), "scale": flat_net.scale})
    assert sorted(full) == sorted(k for k in sd_ref if not k.startswith("frozen."))


def test_missing_or_mismatched_names_are_reported():
    net = Net()
    FlatParameters(net)
    sd = Net().state_dict()
    del sd["a.bias"]
    with pytest.raises(RuntimeError, match="flat"):
        net.load_state_dict(sd)
    sd = Net().state_dict()
    sd["a.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="a.weight"):
        net.load_state_dict(sd)


def test_refresh_follows_to_and_bad_inputs_are_refused():
    net = Net()
    fp = FlatParameters(net)
    net.to(torch.float64)
    fp.refresh()  # GillAdapter does this in its _apply
    assert net.flat.dtype == torch.float64 and net.a.weight.dtype == torch.float64
    assert net.a.weight.untyped_storage().data_ptr() == net.flat.untyped_storage().data_ptr()

    tied = Net()
    tied.b.weight = tied.a.weight  # shapes differ, but the check is on identity
    with pytest.raises(ValueError, match="tied"):
        FlatParameters(tied)
    with pytest.raises(ValueError, match="already"):
        FlatParameters(net)
