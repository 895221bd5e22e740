"""MLP with parametrized weights: every path (forward, loss, backprop) gives the gradients of
autograd on the same parametrized network, and layers it cannot serve are refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.testing import assert_close

import manualbp as mb

D = torch.float64


class Scaled(nn.Module):  # a user's own parametrization, with a parameter of its own
    def __init__(self, n_out):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n_out, dtype=D))

    def forward(self, W):
        return W * self.s[:, None]


class Shifted(nn.Module):  # a parametrized bias
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.3, dtype=D))

    def forward(self, b):
        return b + self.c * b * b


def _parametrized(kind):
    torch.manual_seed(0)
    mlp = mb.MLP([5, 6, 4, 3], activation="tanh", dtype=D)
    for layer in mlp.layers[:2]:
        if kind == "weight_norm":
            parametrizations.weight_norm(layer)
        elif kind == "orthogonal":
            parametrizations.orthogonal(layer)
        else:
            parametrize.register_parametrization(layer, "weight", Scaled(layer.out_features))
    parametrize.register_parametrization(mlp.layers[2], "bias", Shifted())  # bias too
    return mlp


def _autograd_reference(mlp, x, y):
    """loss of the same network by F.linear + torch's activations, autograd all the way."""
    a = x
    for i, layer in enumerate(mlp.layers):
        a = F.linear(a, layer.weight, layer.bias)
        a = torch.tanh(a) if i < len(mlp.layers) - 1 else a
    return F.cross_entropy(a, y)


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "own"])
@pytest.mark.parametrize("accumulate", [True, False])
def test_backprop_reaches_the_parametrizations_parameters(kind, accumulate):
    mlp = _parametrized(kind)
    twin = copy.deepcopy(mlp)
    x, y = torch.randn(7, 5, dtype=D), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    for p in list(mlp.parameters()) + list(twin.parameters()):  # something there already
        p.grad = torch.full_like(p, 0.25)
    loss = mlp.backprop(x, y, accumulate=accumulate)
    if not accumulate:
        twin.zero_grad(set_to_none=True)
    ref = _autograd_reference(twin, x, y)
    ref.backward()
    assert_close(loss, ref.detach())
    named = dict(twin.named_parameters())
    assert any("original" in n for n in named) or kind == "own"
    for name, p in mlp.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, named[name].grad, msg=name)
    for layer in mlp.layers[:2]:  # nothing written on the computed weight itself
        assert "weight" not in layer._parameters


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "own"])
def test_loss_backward_matches_autograd_on_parametrized_layers(kind):
    mlp = _parametrized(kind)
    twin = copy.deepcopy(mlp)
    x, y = torch.randn(7, 5, dtype=D), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    mlp.loss(x, y)[0].backward()
    _autograd_reference(twin, x, y).backward()
    named = dict(twin.named_parameters())
    for name, p in mlp.named_parameters():
        assert_close(p.grad, named[name].grad, msg=name)


@pytest.mark.filterwarnings("ignore:torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("old_style", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_wrappers_are_refused(old_style):
    """torch.nn.utils.weight_norm / spectral_norm recompute W in a forward pre-hook, which the
    one-node pass never calls: the weight would silently stay stale."""
    mlp = mb.MLP([5, 6, 3])
    getattr(nn.utils, old_style)(mlp.layers[1])
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    match = (r"MLP: layers\[1\] has forward hooks \(e.g. from torch.nn.utils.weight_norm or "
             r"spectral_norm\), which MLP never runs.*parametrizations.weight_norm")
    for call in (lambda: mlp(x), lambda: mlp.loss(x, y), lambda: mlp.backprop(x, y)):
        with pytest.raises(ValueError, match=match):
            call()


def test_any_forward_hook_on_a_layer_is_refused():
    mlp = mb.MLP([5, 6, 3])
    mlp.layers[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"MLP: layers\[0\] has forward hooks"):
        mlp(torch.randn(2, 5))
