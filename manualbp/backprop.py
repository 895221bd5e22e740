"""The slides' algorithm for a whole network as plain tensor functions, with no autograd in it.

    forward:   z[i] = a[i-1] W[i]^T + b[i],  a[i] = g(z[i])                       i = 1..L
    output:    delta[L] = (yhat - y) / m       (softmax output, mean cross-entropy)
    backward:  grad_W[i]  = delta[i]^T a[i-1]
               grad_b[i]  = sum(delta[i])
               delta[i-1] = (delta[i] W[i]) * g'(z[i-1])                          i = L..1

Every fused path runs these: MLPFunction and MLPEagerFunction (one autograd node each) and
MLP.backprop (no autograd at all). Rows are examples: a[0] = x is (m, n_0).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.activations import ACTIVATIONS, G_INPLACE
from manualbp.linear import delta_from, layer_grads

IGNORE_INDEX = -100  # as F.cross_entropy: a target equal to it contributes nothing
_MEAN = 1  # aten's reduction code for "mean"


class Step(NamedTuple):
    """One layer's activation as the passes need it."""

    name: str
    g: object  # torch's g, None for identity
    g_inplace: object  # g applied in place to a fresh z, when g' reads a (else None)
    keeps_z: bool  # g' needs z, so the forward keeps it


_PLANS: dict[tuple[str, ...], tuple[Step, ...]] = {}


def plan(activations: tuple[str, ...]) -> tuple[Step, ...]:
    """The per-layer Steps for a tuple of activation names (memoised: models reuse theirs; a
    plain dict rather than functools.lru_cache, which torch.compile warns about)."""
    steps = _PLANS.get(activations)
    if steps is None:
        steps = _PLANS[activations] = tuple(_step(name) for name in activations)
    return steps


def _step(name: str) -> Step:
    act = ACTIVATIONS[name]
    identity = act.g_prime is None
    return Step(name, None if identity else act.g, G_INPLACE.get(name),
                not identity and not act.from_output)


def forward_pass(a: Tensor, steps, params, inplace: bool = False):
    """a[1..L] and z[1..L] (None where g' does not need z), as two lists, from a[0] (m, n_0).

    inplace: apply g in place on each fresh z when g' reads a (no autograd is recording z, or
    what records it does not need z).
    """
    outs: list[Tensor] = []
    zs: list[Tensor | None] = []
    for i, step in enumerate(steps):
        z = F.linear(a, params[2 * i], params[2 * i + 1])  # (m, n_i)
        if step.g is None:
            a = z
        elif inplace and step.g_inplace is not None:
            a = step.g_inplace(z)
        else:
            a = step.g(z)
        outs.append(a)
        zs.append(z if step.keeps_z else None)
    return outs, zs


def softmax_ce_forward(z_L: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log yhat, mean cross-entropy, count of targets not ignored), as F.cross_entropy."""
    log_yhat = torch.log_softmax(z_L, 1)
    loss, count = torch.ops.aten.nll_loss_forward(log_yhat, y, None, _MEAN, IGNORE_INDEX)
    return log_yhat, loss, count


def softmax_ce_delta(grad_loss: Tensor, log_yhat: Tensor, y: Tensor, count: Tensor) -> Tensor:
    """delta[L] = (yhat - y) * grad_loss / count: the one-hot -y / count lands at each target
    (nll_loss_backward), then log-softmax's backward adds yhat times that row's total, 1/count
    (0 for an ignored row). Two kernels, the same as autograd runs for F.cross_entropy."""
    minus_y = torch.ops.aten.nll_loss_backward(grad_loss, log_yhat, y, None, _MEAN, IGNORE_INDEX,
                                               count)
    return torch._log_softmax_backward_data(minus_y, log_yhat, 1, log_yhat.dtype)


def backward_pass(grad_a: Tensor | None, own: bool, x: Tensor, outs, zs, weights, steps, needs,
                  scratch: bool, extra_a=None, extra_z=None, deltas=None, probes=None):
    """Every grad_W[i], grad_b[i] (as a flat list W1, b1, ...) and dL/dx, by the recursion.

    grad_a: dL/da[L] (m, n_L) or None; own: it is a temporary of ours, free to overwrite.
    outs, zs: a[1..L] and z[1..L] as forward_pass gives them (a[L] may be None when the output
    layer's g' does not read it). Both lists are consumed: each entry is dropped once used, so
    the pass holds no activation longer than the recursion needs it.
    needs: (dL/dx wanted, then per parameter W1, b1, ... whether it is wanted).
    scratch: no graph is being built (no create_graph), so our own temporaries may be reused.
    extra_a / extra_z: per layer, gradient arriving from outside at a[i] / z[i], or None.
    deltas: a list to receive each delta[i] (L first), for a Trace.
    probes: per layer, a manualbp.per_example probe or None (see linear.layer_grads), or None.
    """
    L = len(steps)
    grads: list[Tensor | None] = [None] * (2 * L)
    for i in range(L - 1, -1, -1):  # layer i + 1 in the slides' numbering
        if extra_a is not None and extra_a[i] is not None:  # someone used a[i] itself
            e = extra_a[i]
            grad_a, own = (e, False) if grad_a is None else (grad_a + e, scratch)
        delta = None
        if grad_a is not None:  # delta = grad_a * g'(z)
            step = steps[i]
            t = zs[i] if step.keeps_z else outs[i]
            delta = delta_from(grad_a, t, step.name, inplace=own)
        if extra_z is not None and extra_z[i] is not None:
            delta = extra_z[i] if delta is None else delta + extra_z[i]
        grad_a = None
        outs[i] = zs[i] = None  # a[i] and z[i] have served; a[i-1] is still needed below
        if delta is None:  # no gradient reached this layer
            continue
        if deltas is not None:
            deltas.append(delta)
        a_prev = outs[i - 1] if i > 0 else x
        # the one per-layer step every path shares: grad_W = delta^T a_prev, grad_b = sum(delta),
        # dL/da[i-1] = delta W
        grad_a, grads[2 * i], grads[2 * i + 1] = layer_grads(
            delta, a_prev, weights[i], (i > 0 or needs[0], needs[1 + 2 * i], needs[2 + 2 * i]),
            None if probes is None else probes[i])
        own = scratch
    return grads, grad_a
