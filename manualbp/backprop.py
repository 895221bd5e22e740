"""The slides' algorithm for a whole network as plain tensor functions, with no autograd in it.

    forward:   z[i] = a[i-1] W[i]^T + b[i],  a[i] = g(z[i])                       i = 1..L
    output:    delta[L] = (yhat - y) / m       (softmax output, mean cross-entropy)
    backward:  grad_W[i]  = delta[i]^T a[i-1]
               grad_b[i]  = sum(delta[i])
               delta[i-1] = (delta[i] W[i]) * g'(z[i-1])                          i = L..1

A learning rule (manualbp.rules) replaces W[i] in the last line by the layer's feedback B[i]
or, for direct feedback alignment, sends every hidden layer delta[L] D[i] instead.

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
                  scratch: bool, extra_a=None, extra_z=None, deltas=None, probes=None,
                  feedback=None, direct: bool = False, backprop_deltas=None):
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
    feedback: a learning rule's matrix per layer (None: backprop, W throughout).
        direct=False: B[i] shaped like W[i]; dL/da[i-1] = delta[i] B[i]. needs then also holds,
        after the 2L parameters, whether each B[i] wants a gradient (Kolen-Pollack's is
        grad_W[i]), and grads grows by those L entries.
        direct=True (DFA): D[i] (n_L, n_i) for each hidden layer (None for the output layer);
        dL/da[i] = delta[L] D[i], all from delta[L] alone, and only dL/dx still uses W[1].
    backprop_deltas: a list to receive, under a rule, the delta[i] that backprop's recursion
        (through W) would give on the same batch, L first: for alignment pictures.
    """
    L = len(steps)
    grads: list[Tensor | None] = [None] * (2 * L)
    per_layer = feedback is not None and not direct
    if per_layer:
        grads += [None] * L  # Kolen-Pollack's gradients of B[1..L]
    delta_L = bp_grad_a = None
    for i in range(L - 1, -1, -1):  # layer i + 1 in the slides' numbering
        if direct and i < L - 1:  # DFA: the error comes straight from the output layer
            grad_a = None if delta_L is None else delta_L.mm(feedback[i])  # (m, n_i)
            own = scratch
        if extra_a is not None and extra_a[i] is not None:  # someone used a[i] itself
            e = extra_a[i]
            grad_a, own = (e, False) if grad_a is None else (grad_a + e, scratch)
        delta = None
        if grad_a is not None:  # delta = grad_a * g'(z)
            step = steps[i]  # g's input left unnamed, so that outs[i] = zs[i] = None frees it
            delta = delta_from(grad_a, zs[i] if step.keeps_z else outs[i], step.name, inplace=own)
        if extra_z is not None and extra_z[i] is not None:
            delta = extra_z[i] if delta is None else delta + extra_z[i]
        if backprop_deltas is not None:
            bp_grad_a = _backprop_delta(i, L, delta, bp_grad_a, steps, outs, zs, weights,
                                        extra_a, extra_z, backprop_deltas)
        grad_a = None
        outs[i] = zs[i] = None  # a[i] and z[i] have served; a[i-1] is still needed below
        if direct and i == L - 1:  # DFA's hidden layers read it
            delta_L = delta
        if delta is None:  # no gradient reached this layer
            continue
        if deltas is not None:
            deltas.append(delta)
        a_prev = outs[i - 1] if i > 0 else x
        need_B = per_layer and needs[1 + 2 * L + i]
        need_down = (i == 0 and needs[0]) if direct else (i > 0 or needs[0])
        # the one per-layer step every path shares: grad_W = delta^T a_prev, grad_b = sum(delta),
        # dL/da[i-1] = delta W (or delta B[i] under a rule)
        grad_a, grad_W, grads[2 * i + 1] = layer_grads(
            delta, a_prev, weights[i], (need_down, needs[1 + 2 * i] or need_B, needs[2 + 2 * i]),
            feedback=feedback[i] if per_layer else None,
            probe=None if probes is None else probes[i])
        grads[2 * i] = grad_W if needs[1 + 2 * i] else None
        if need_B:
            grads[2 * L + i] = grad_W  # Kolen-Pollack: B gets W's update
        own = scratch
    return grads, grad_a


def _backprop_delta(i, L, delta, bp_grad_a, steps, outs, zs, weights, extra_a, extra_z, out):
    """Append backprop's delta[i] (its recursion through W, beside the rule's) to out and
    return backprop's dL/da[i-1]."""
    if i == L - 1:
        bp = delta  # the output layer's delta is the loss's, whatever the rule
    else:
        if extra_a is not None and extra_a[i] is not None:
            bp_grad_a = extra_a[i] if bp_grad_a is None else bp_grad_a + extra_a[i]
        bp = None
        if bp_grad_a is not None:
            step = steps[i]
            bp = delta_from(bp_grad_a, zs[i] if step.keeps_z else outs[i], step.name)
        if extra_z is not None and extra_z[i] is not None:
            bp = extra_z[i] if bp is None else bp + extra_z[i]
    out.append(bp)
    return None if bp is None or i == 0 else bp.mm(weights[i])
