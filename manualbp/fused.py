"""The whole network's backward in one hand-written pass: the slides' algorithm as written.

Forward computes a[1..L] layer by layer; backward starts from delta[L] and runs the recursion

    grad_W[i]  = delta[i]^T a[i-1]                       (n_i, n_{i-1})
    grad_b[i]  = sum(delta[i])                           (n_i,)
    delta[i-1] = (delta[i] W[i]) * g'(z[i-1])            (m, n_{i-1})

for i = L..1, producing every gradient in one autograd node instead of one node per op. With a
target, the softmax + cross-entropy output layer is folded in too: delta[L] = (yhat - y) / m.

The hidden a[i] (and z[i] where g' needs z) are returned as extra outputs of the Function and
saved as outputs, not as intermediates, so double backward and saved-tensor hooks see them.
"""

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import ACTIVATIONS
from manualbp.linear import delta_from
from manualbp.losses import yhat_minus_y


class Trace:
    """Records, detached, a[i] (in forward) and delta[i] = dL/dz[i] (in backward), i = 1..L.

    Pass one to MLP.forward(x, trace=...) in eager mode; a[0] is the first hidden layer, a[-1]
    the output, and delta is in the same order once backward has run.
    """

    def __init__(self) -> None:
        self.a: list[Tensor] = []
        self.delta: list[Tensor] = []


@lru_cache(maxsize=256)
def _layout(activations: tuple[str, ...]) -> tuple[tuple[int, int | None, int | None], ...]:
    """Per layer, where its a, its z and what its g' reads sit among the Function's outputs.

    Output 0 is a[L]; then per hidden layer a[i] and, when g' needs z, z[i]; the output layer
    adds its z last when its g' needs z. Returns (a_idx, z_idx, t_idx); None where absent.
    """
    layout, idx, L = [], 1, len(activations)
    for i, activation in enumerate(activations):
        act = ACTIVATIONS[activation]
        a_idx = 0
        if i < L - 1:
            a_idx, idx = idx, idx + 1
        z_idx = None
        if act.g_prime is not None and not act.from_output:
            z_idx, idx = idx, idx + 1
        t_idx = None if act.g_prime is None else (a_idx if act.from_output else z_idx)
        layout.append((a_idx, z_idx, t_idx))
    return tuple(layout)


class MLPFunction(Function):
    """a_L, *extras[, loss] = MLPFunction.apply(x, target, activations, trace, W1, b1, ..., WL, bL).

    activations: one name per layer (MLP passes identity for the last). Biases may be None.
    extras: the hidden a[i] and the z[i] whose g' needs z, laid out by _layout. target: None, or
    class indices (m,) for the folded softmax cross-entropy, whose mean loss is then appended.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, activations, trace, *params):
        lead = x.shape[:-1]
        a = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # (m, n_0): rows are examples
        extras: list[Tensor] = []
        L = len(activations)
        for i, activation in enumerate(activations):
            W, b = params[2 * i], params[2 * i + 1]
            z = torch.addmm(b, a, W.t()) if b is not None else a.mm(W.t())  # (m, n_i)
            act = ACTIVATIONS[activation]
            a = z if act.g_prime is None else act.g(z)
            if trace is not None:
                trace.a.append(a.detach().reshape(*lead, -1))
            if i < L - 1:
                extras.append(a)
            if act.g_prime is not None and not act.from_output:
                extras.append(z)
        a_L = a.reshape(*lead, a.shape[-1]) if x.dim() != 2 else a
        if target is None:
            return (a_L, *extras)
        # In float32 for half inputs, as autocast runs F.cross_entropy; returned too, since
        # backward's yhat is exp(log_yhat).
        log_yhat = torch.log_softmax(a.float() if a.element_size() < 4 else a, 1)
        loss = F.nll_loss(log_yhat, target.reshape(-1))  # (1/m) sum -log yhat_y
        return (a_L, *extras, log_yhat, loss)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, activations, trace, *params = inputs
        ctx.layout = layout = _layout(activations)
        ctx.activations = activations
        ctx.trace = trace
        ctx.set_materialize_grads(False)
        ctx.head = target is not None
        extras = output[1:-2] if ctx.head else output[1:]
        # a[L] is saved when the output layer's own g' reads it; log yhat for the folded softmax.
        ctx.save_last = layout[-1][2] == 0
        last = [output[0]] if ctx.save_last else []
        log_yhat = [output[-2]] if ctx.head else []
        weights = list(params[0::2])
        if not ctx.needs_input_grad[0]:
            weights[0] = None  # W[1] only serves dL/dx; under autocast it is a real copy
        ctx.save_for_backward(x, target, *weights, *extras, *last, *log_yhat)

    @staticmethod
    def backward(ctx, *grad_out):
        activations, layout, needs = ctx.activations, ctx.layout, ctx.needs_input_grad
        L = len(activations)
        x, target, *saved = ctx.saved_tensors
        weights, saved = saved[:L], saved[L:]
        log_yhat = saved.pop() if ctx.head else None
        out = [saved.pop() if ctx.save_last else None, *saved]  # indexed as _layout says
        scratch = not torch.is_grad_enabled()  # no create_graph: our own temporaries may be reused
        grad_a = grad_out[0]  # dL/da[L] from whoever used the output
        if grad_a is not None and grad_a.dim() != 2:
            grad_a = grad_a.reshape(-1, grad_a.shape[-1])
        own = False  # is grad_a a temporary of ours (never the caller's tensor)?
        if ctx.head:
            grad_a, own = _folded_softmax_delta(grad_a, grad_out[-1], grad_out[-2], log_yhat,
                                                target, scratch)
            if grad_a is not None and grad_a.dtype != weights[-1].dtype:  # float32 head
                grad_a, own = grad_a.to(weights[-1].dtype), scratch
        grads: list[Tensor | None] = [None] * (2 * L)
        deltas: list[Tensor] = []  # kept only for a Trace
        for i in range(L - 1, -1, -1):  # layer i + 1 in the slides' numbering
            a_idx, z_idx, t_idx = layout[i]
            if i < L - 1 and grad_out[a_idx] is not None:  # someone used a hidden a
                extra = grad_out[a_idx]
                grad_a, own = (extra, False) if grad_a is None else (grad_a + extra, scratch)
            delta = None
            if grad_a is not None:  # delta = grad_a * g'(z)
                t = None if t_idx is None else out[t_idx]
                if t is not None and t.dim() != 2:
                    t = t.reshape(grad_a.shape)
                delta = delta_from(grad_a, t, activations[i], inplace=own)
            if z_idx is not None and grad_out[z_idx] is not None:
                delta = grad_out[z_idx] if delta is None else delta + grad_out[z_idx]
            grad_a = None
            if delta is None:  # no gradient reached this layer
                continue
            if ctx.trace is not None:
                deltas.append(delta)
            a_prev = out[layout[i - 1][0]] if i > 0 else x.reshape(-1, x.shape[-1])
            if needs[4 + 2 * i]:
                grads[2 * i] = delta.t().mm(a_prev)  # grad_W = delta^T a_prev
            if needs[5 + 2 * i]:
                grads[2 * i + 1] = delta.sum(0)  # grad_b = sum(delta)
            if i > 0 or needs[0]:
                grad_a, own = delta.mm(weights[i]), scratch  # dL/da[i-1] = delta W
            delta = None  # free it before the next layer's delta is made
        grad_x = grad_a.reshape(x.shape) if grad_a is not None and needs[0] else None
        if ctx.trace is not None:
            lead = x.shape[:-1]
            ctx.trace.delta = [d.detach().reshape(*lead, -1) for d in reversed(deltas)]
        return (grad_x, None, None, None, *grads)


def _folded_softmax_delta(grad_a, grad_loss, grad_log_yhat, log_yhat, target, scratch):
    """dL/da[L] from the folded softmax cross-entropy: (yhat - y) / m times the loss's grad.

    Returns (grad_a, whether it is a temporary of ours).
    """
    if grad_loss is not None:
        yhat = torch.exp(log_yhat)  # (m, C)
        y = target.reshape(-1, 1)
        if scratch:  # delta_L = yhat - y, built in yhat's own buffer
            delta_L = yhat.scatter_add_(1, y, yhat.new_full((1, 1), -1.0).expand(len(y), 1))
            delta_L.mul_(grad_loss / len(y))  # the slides' 1/m
        else:
            delta_L = yhat_minus_y(yhat, y) * (grad_loss / len(y))
        grad_a = delta_L if grad_a is None else grad_a + delta_L
    if grad_log_yhat is not None:  # only double backward reaches log yhat
        g = grad_log_yhat
        g = g - torch.exp(log_yhat) * g.sum(1, keepdim=True)  # through log softmax
        grad_a = g if grad_a is None else grad_a + g
    return grad_a, scratch and (grad_loss is not None or grad_log_yhat is not None)
