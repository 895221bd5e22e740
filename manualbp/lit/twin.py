"""The autograd twin of a manualbp MLP: nn.Linear layers and torch's activations, same weights.

backend=autograd trains this twin instead of the hand-written backward. Built from the very
mb.MLP the manual backend would train, it starts from bit-identical weights, so the two
backends' loss curves can be laid over each other in TensorBoard.
"""

from functools import partial

import torch
from torch import Tensor, nn

import manualbp as mb


class Act(nn.Module):
    """a = g(z) with torch's own g from mb.ACTIVATIONS, differentiated by autograd.

    Args:
        name: a key of mb.ACTIVATIONS.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, z: Tensor) -> Tensor:
        return mb.ACTIVATIONS[self.name].g(z)

    def extra_repr(self) -> str:
        return self.name


def build_twin(mlp: nn.Module) -> nn.Sequential:
    """nn.Sequential(Linear, Act, ..., Linear) with a copy of each of mlp.layers' weights.

    Args:
        mlp: a network with `layers`, a sequence of mb.Linear (each with `.activation`).
    """
    modules: list[nn.Module] = []
    # The twin's own initialisation draws random numbers; fork the RNG so both backends leave
    # the global generator in the same state (same data shuffling afterwards).
    with torch.random.fork_rng(devices=[]):
        for layer in mlp.layers:
            w = layer.weight
            linear = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None,
                               device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            modules.append(linear)
            if layer.activation != "identity":
                modules.append(Act(layer.activation))
    return nn.Sequential(*modules)


def _store_delta(deltas: list, i: int, grad: Tensor) -> None:
    deltas[i] = grad.detach()


def twin_forward(twin: nn.Sequential, x: Tensor, trace: mb.Trace | None = None) -> Tensor:
    """Run the twin; with a trace, record a[i] now and delta[i] when backward reaches z[i].

    The grad of each nn.Linear output z[i] is delta[i] = dL/dz[i]; a tensor hook catches it.
    The trace ends up laid out as mb.MLP's: trace.a[i-1] = a[i], trace.delta[i-1] = delta[i].
    """
    if trace is None:
        return twin(x)
    n_layers = sum(isinstance(m, nn.Linear) for m in twin)
    trace.delta = [None] * n_layers
    a = x
    for module in twin:
        a = module(a)
        if isinstance(module, nn.Linear):  # a is z[i]
            if a.requires_grad:
                a.register_hook(partial(_store_delta, trace.delta, len(trace.a)))
            trace.a.append(a.detach())
        else:  # a = g(z[i]) replaces z[i]
            trace.a[-1] = a.detach()
    return a
