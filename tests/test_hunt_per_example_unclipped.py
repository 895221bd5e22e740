"""per_example(max_norm=C) counted every mb.Linear's parameters as covered, but only a call of
manualbp's own forward hands the block its share: a Linear subclass whose forward is
F.linear(x, self.weight, self.bias), or a weight also used outside its layer, got its plain
autograd gradient, unclipped (|grad| 0.44 and 0.55 under C = 1e-3), with no word: uncovered
was [] and max_norm was not refused. The block now refuses it in one line at exit (both
backends), and a subclass that runs manualbp's forward is still served exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import manualbp as mb

D = torch.float64


class OwnForward(mb.Linear):  # its forward never reaches manualbp's Function
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Doubled(mb.Linear):  # runs manualbp's forward: covered for real
    def forward(self, x):
        return 2 * super().forward(x)


class WeightAlsoOutside(nn.Module):  # the layer's weight used again, outside the layer
    def __init__(self):
        super().__init__()
        self.a = mb.Linear(4, 3, dtype=D)

    def forward(self, x):
        return self.a(x) + F.linear(x, self.a.weight)


def _data():
    torch.manual_seed(0)
    return torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))


_MODELS = {
    "a subclass with its own forward": lambda: nn.Sequential(
        mb.Linear(4, 5, activation="tanh", dtype=D), OwnForward(5, 3, dtype=D)),
    "a weight used outside its layer": WeightAlsoOutside,
}


@pytest.mark.parametrize("model", sorted(_MODELS))
@pytest.mark.parametrize("existing_grad", [False, True])
def test_a_gradient_the_clip_cannot_reach_is_refused(core, model, existing_grad):
    torch.manual_seed(1)
    net = _MODELS[model]()
    x, y = _data()
    if existing_grad:  # accumulation: a .grad already there that the backward adds into
        F.cross_entropy(net(x), y).backward()
    with pytest.raises(ValueError, match=r"per_example: \S+weight received a gradient "
                                         r"inside the block that did not come through its "
                                         r"manualbp layer's backward.*max_norm cannot clip"):
        with mb.per_example(net, max_norm=1e-3):
            F.cross_entropy(net(x), y).backward()


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_subclass_that_runs_manualbps_forward_is_clipped_exactly(core, accumulate):
    torch.manual_seed(2)
    net = nn.Sequential(mb.Linear(4, 5, activation="tanh", dtype=D), Doubled(5, 3, dtype=D))
    x, y = _data()
    C = 0.3
    before = {}
    if accumulate:
        F.cross_entropy(net(x), y).backward()
        before = {k: p.grad.clone() for k, p in net.named_parameters()}
    params = {k: p.detach() for k, p in net.named_parameters()}
    g = vmap(grad(lambda p, xn, yn: F.cross_entropy(functional_call(net, p, (xn[None],)),
                                                    yn[None])), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(t.reshape(6, -1).square().sum(1) for t in g.values()))
    c = (C / (norms + 1e-6)).clamp(max=1)
    with mb.per_example(net, max_norm=C) as pe:
        F.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(pe.norms, norms, rtol=1e-12, atol=0)
    for k, p in net.named_parameters():
        want = (c.view(-1, *[1] * (g[k].dim() - 1)) * g[k]).mean(0) + before.get(k, 0)
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-14, msg=k)
