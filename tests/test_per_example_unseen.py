"""A norms block (no max_norm) whose covered layer's own backward never reached it, while its
parameter still got a gradient (a Linear subclass with a forward of its own), left that layer out
of pe.norms with no word: uncovered was [] and the norms were those of the other layers alone.
The block now refuses it at exit, in one line naming the parameter, on both backends; a layer
the forward did not use at all (no gradient) is no error, and its share of every norm is 0."""

import pytest
import torch
import torch.nn.functional as F
from test_hunt_per_example_unclipped import D, OwnForward, _data
from torch import nn
from torch.func import functional_call, grad, vmap

import manualbp as mb


class Branches(nn.Module):  # `b` is covered but not used by this forward
    def __init__(self):
        super().__init__()
        self.a, self.b = mb.Linear(4, 3, dtype=D), mb.Linear(4, 3, dtype=D)

    def forward(self, x):
        return self.a(x)


def test_a_norms_block_refuses_a_layer_whose_backward_it_never_saw(core):
    torch.manual_seed(1)
    model = nn.Sequential(mb.Linear(4, 5, activation="tanh", dtype=D), OwnForward(5, 3, dtype=D))
    x, y = _data()
    with pytest.raises(ValueError, match=r"per_example: 1\.weight received a gradient .*"
                                         "the norms would leave it out"):
        with mb.per_example(model):
            F.cross_entropy(model(x), y).backward()


def test_an_unused_covered_layer_is_no_error_and_adds_nothing(core):
    torch.manual_seed(2)
    model = Branches()
    x, y = _data()
    with mb.per_example(model) as pe:
        F.cross_entropy(model(x), y).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xn, yn):  # example n's loss, scaled as the block's mean reduction is
        return F.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    want = torch.sqrt(sum(t.reshape(6, -1).square().sum(1) for t in g.values()))
    torch.testing.assert_close(pe.norms, want, rtol=1e-10, atol=0)
    assert model.b.weight.grad is None
