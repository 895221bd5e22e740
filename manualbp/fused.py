"""The whole network's backward in one hand-written pass: the slides' algorithm as written.

Forward computes a[1..L] layer by layer; backward starts from delta[L] and runs the recursion
of manualbp.backprop for i = L..1, producing every gradient in one autograd node instead of one
node per op. With a target, the softmax + cross-entropy output layer is folded in too:
delta[L] = (yhat - y) / m.

Two Functions run that pass. MLPFunction is the general one, in the forward + setup_context
style that torch.func and torch.compile need: the hidden a[i] (and z[i] where g' needs z) are
returned as extra outputs and saved as outputs, so double backward and saved-tensor hooks see
them. MLPEagerFunction is the lean one MLP uses in plain eager mode: it returns only the logits
(and the loss), saves the hidden a[i] directly, and under create_graph recomputes them from the
saved x and weights so that second derivatives stay exact.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import rules
from manualbp.activations import ACTIVATIONS
from manualbp.apply import forward_mode, with_jvp
from manualbp.backprop import (
    IGNORE_INDEX,
    backward_pass,
    forward_pass,
    plan,
    softmax_ce_delta,
    softmax_ce_forward,
)
from manualbp.linear import linear_tangent


class Trace:
    """Records, detached, a[i] (in forward) and delta[i] = dL/dz[i] (in backward), i = 1..L.

    Pass one to MLP.forward(x, trace=...) in eager mode; a[0] is the first hidden layer, a[-1]
    the output, and delta is in the same order once backward has run. Under a learning rule,
    delta_backprop holds, in the same order, the delta[i] backprop's recursion through W would
    have given on the same batch (computed in the same pass); it stays empty for backprop.
    """

    def __init__(self) -> None:
        self.a: list[Tensor] = []
        self.delta: list[Tensor] = []
        self.delta_backprop: list[Tensor | None] = []


_LAYOUTS: dict[tuple[str, ...], tuple] = {}


def _layout(activations: tuple[str, ...]) -> tuple[tuple[int, int | None, int | None], ...]:
    """Per layer, where its a, its z and what its g' reads sit among the Function's outputs.

    Output 0 is a[L]; then per hidden layer a[i] and, when g' needs z, z[i]; the output layer
    adds its z last when its g' needs z. Returns (a_idx, z_idx, t_idx); None where absent.
    Memoised in a plain dict (torch.compile warns about functools.lru_cache).
    """
    layout = _LAYOUTS.get(activations)
    if layout is None:
        layout = _LAYOUTS[activations] = _build_layout(activations)
    return layout


def _build_layout(activations):
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


def _rows(t: Tensor) -> Tensor:
    """(*, n) as (m, n): every leading dim is an example."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


@with_jvp
class MLPFunction(Function):
    """a_L, *extras[, log_yhat, loss] = MLPFunction.apply(x, target, activations, trace, W1, b1,
    ..., WL, bL).

    activations: one name per layer (MLP passes identity for the last). Biases may be None.
    trace: a Trace, or None, or manualbp.per_example's probes for this node (an object with a
    `probes` list, one per layer, that backward hands to the pass, and a `trace`).
    extras: the hidden a[i] and the z[i] whose g' needs z, laid out by _layout. target: None, or
    class indices (m,) for the folded softmax cross-entropy (F.cross_entropy's, ignore_index
    -100), whose log yhat and mean loss are then appended.
    A learning rule appends, after bL, one feedback matrix per layer and its source
    (manualbp.rules.split): ..., WL, bL, B1, ..., BL, "per_layer" or ..., D1, ..., None, "direct".
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, activations, trace, *params):
        trace = _trace_and_probes(trace)[0]
        lead = x.shape[:-1]
        params = params[:2 * len(activations)]  # a rule's feedback serves backward only
        outs, zs = forward_pass(_rows(x), plan(activations), params)
        if trace is not None:
            trace.a = [a.detach().reshape(*lead, -1) for a in outs]
        extras: list[Tensor] = []
        for i, (a, z) in enumerate(zip(outs, zs, strict=True)):
            if i < len(outs) - 1:
                extras.append(a)
            if z is not None:
                extras.append(z)
        a = outs[-1]
        a_L = a.reshape(*lead, a.shape[-1]) if x.dim() != 2 else a
        if target is None:
            return (a_L, *extras)
        # In float32 for half inputs, as autocast runs F.cross_entropy; returned too, since
        # backward's yhat is exp(log_yhat).
        log_yhat = torch.log_softmax(a.float() if a.element_size() < 4 else a, 1)
        loss = F.nll_loss(log_yhat, target.reshape(-1), ignore_index=IGNORE_INDEX)
        return (a_L, *extras, log_yhat, loss)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, activations, trace, *params = inputs
        params, feedback, ctx.source = rules.split(len(activations), params)
        ctx.layout = layout = _layout(activations)
        ctx.activations = activations
        ctx.trace, ctx.probes = _trace_and_probes(trace)
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
        ctx.save_for_backward(x, target, *weights, *(feedback or ()), *extras, *last, *log_yhat)
        ctx.n_params = len(params)
        if forward_mode():
            ctx.save_for_forward(x, target, *params, *(output[:-1] if ctx.head else output))

    @staticmethod
    def _jvp(ctx, d_x, _target, _activations, _trace, *d_params):
        """Forward mode through the same layers: dz[i] = da[i-1] W[i]^T + a[i-1] dW[i]^T + db[i],
        da[i] = g'(z[i]) dz[i]; then, with a target, through log softmax and the mean NLL."""
        x, target, *saved = ctx.saved_tensors
        params, out = saved[:ctx.n_params], saved[ctx.n_params:]
        layout, L = ctx.layout, len(ctx.activations)
        tangents = [None] * len(out)
        a_prev, da = _rows(x), None if d_x is None else _rows(d_x)
        for i, (activation, (a_idx, z_idx, t_idx)) in enumerate(zip(ctx.activations, layout,
                                                                     strict=True)):
            dz = linear_tangent(a_prev, params[2 * i], da, d_params[2 * i], d_params[2 * i + 1])
            g_prime = ACTIVATIONS[activation].g_prime
            da = dz if g_prime is None else g_prime(_rows(out[t_idx])) * dz
            if z_idx is not None:
                tangents[z_idx] = dz.reshape(out[z_idx].shape)
            tangents[a_idx] = da.reshape(out[a_idx].shape)
            a_prev = _rows(out[a_idx]) if i < L - 1 else None
        if not ctx.head:
            return tuple(tangents)
        log_yhat = out[-1]
        dz_L = da.to(log_yhat.dtype)
        d_log_yhat = dz_L - (torch.exp(log_yhat) * dz_L).sum(1, keepdim=True)
        y = target.reshape(-1)
        valid = y != IGNORE_INDEX
        picked = d_log_yhat.gather(1, y.masked_fill(~valid, 0)[:, None])[:, 0]
        d_loss = -(picked * valid).sum() / valid.sum()  # the mean over the rows not ignored
        tangents[-1] = d_log_yhat
        return (*tangents, d_loss)

    @staticmethod
    def backward(ctx, *grad_out):
        activations, layout, needs = ctx.activations, ctx.layout, ctx.needs_input_grad
        L = len(activations)
        x, target, *saved = ctx.saved_tensors
        weights, saved = saved[:L], saved[L:]
        feedback = None
        if ctx.source is not None:
            feedback, saved = saved[:L], saved[L:]
        log_yhat = saved.pop() if ctx.head else None
        out = [saved.pop() if ctx.save_last else None, *saved]  # indexed as _layout says
        scratch = not torch.is_grad_enabled()  # no create_graph: our own temporaries may be reused
        grad_a, own = grad_out[0], False  # dL/da[L] from whoever used the output
        if grad_a is not None:
            grad_a = _rows(grad_a)
        if ctx.head:
            grad_a, own = _folded_softmax_delta(grad_a, grad_out[-1], grad_out[-2], log_yhat,
                                                target.reshape(-1), scratch)
            if grad_a is not None and grad_a.dtype != weights[-1].dtype:  # float32 head
                grad_a, own = grad_a.to(weights[-1].dtype), scratch
        lead = x.shape[:-1]
        outs = [_rows(out[a_idx]) if i < L - 1 or ctx.save_last else None
                for i, (a_idx, _, _) in enumerate(layout)]
        zs = [None if z_idx is None else _rows(out[z_idx]) for _, z_idx, _ in layout]
        # gradient that reached a hidden a[i] or a z[i] directly, from whoever used them
        extra_a = [_rows_or_none(grad_out[a_idx]) if i < L - 1 else None
                   for i, (a_idx, _, _) in enumerate(layout)]
        extra_z = [None if z_idx is None else _rows_or_none(grad_out[z_idx])
                   for _, z_idx, _ in layout]
        deltas = [] if ctx.trace is not None else None
        bp_deltas = [] if ctx.trace is not None and feedback is not None else None
        direct = ctx.source == rules.DIRECT
        grads, grad_x = backward_pass(
            grad_a, own, _rows(x), outs, zs, weights, plan(activations), (needs[0], *needs[4:]),
            scratch, extra_a, extra_z, deltas, ctx.probes, feedback=feedback, direct=direct,
            backprop_deltas=bp_deltas)
        if ctx.trace is not None:
            ctx.trace.delta = [d.detach().reshape(*lead, -1) for d in reversed(deltas)]
            ctx.trace.delta_backprop = [None if d is None else d.detach().reshape(*lead, -1)
                                        for d in reversed(bp_deltas or [])]
        grad_x = grad_x.reshape(x.shape) if grad_x is not None and needs[0] else None
        return (grad_x, None, None, None, *grads, *_rule_tail(ctx.source, L))


def _rule_tail(source, L: int) -> tuple:
    """The Nones a rule's trailing arguments get beyond what backward_pass returns: D[1..L]
    (DFA's are fixed) and the source string."""
    if source is None:
        return ()
    return (None,) * (L + 1) if source == rules.DIRECT else (None,)


def _trace_and_probes(trace):
    """(Trace or None, per-layer per_example probes or None) from MLPFunction's trace slot."""
    probes = getattr(trace, "probes", None)
    return (trace, None) if probes is None else (trace.trace, probes)


def _rows_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else _rows(t)


def _folded_softmax_delta(grad_a, grad_loss, grad_log_yhat, log_yhat, y, scratch):
    """dL/da[L] from the folded softmax cross-entropy: (yhat - y) / m times the loss's grad.

    Returns (grad_a, whether it is a temporary of ours).
    """
    if grad_loss is not None:
        count = (y != IGNORE_INDEX).sum().to(log_yhat.dtype)  # the m of the mean
        delta_L = softmax_ce_delta(grad_loss, log_yhat, y, count)
        grad_a = delta_L if grad_a is None else grad_a + delta_L
    if grad_log_yhat is not None:  # only double backward reaches log yhat
        g = grad_log_yhat
        g = g - torch.exp(log_yhat) * g.sum(1, keepdim=True)  # through log softmax
        grad_a = g if grad_a is None else grad_a + g
    return grad_a, scratch and (grad_loss is not None or grad_log_yhat is not None)


# torch's own readings (private: torch 2.6 and 2.7 have no way to read the hook stack, and
# then everything goes through save_for_backward, as it always did)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _no_saved_tensor_hooks() -> bool:
    """Whether no saved-tensor hooks are set (save_on_cpu, checkpointing, ...).

    Then MLPEagerFunction holds a[1..L-1], z[1..L] and log yhat on ctx, not in save_for_backward:
    they are its own (no one else sees them, so nothing changes them in place), and its
    backward lets each go once it has served, as autograd's per-op nodes free theirs, rather
    than all at its end (1.4x autograd's peak at [784,256,256,10]). With hooks set they go
    through save_for_backward, so that the hooks see every tensor kept.
    """
    return _TOP_HOOKS is not None and _KEEP_GRAPH is not None and _TOP_HOOKS(False) is None


class MLPEagerFunction(Function):
    """logits[, loss] = MLPEagerFunction.apply(x, target, activations, W1, b1, ..., WL, bL).

    MLPFunction's pass with the fewest outputs and no per-call bookkeeping, for plain eager
    mode only (old-style forward(ctx, ...): torch.func and torch.compile take MLPFunction).
    x: (*, n_0) float32/float64; target: None, or class indices of shape (*).
    """

    @staticmethod
    def forward(ctx, x, target, activations, *params):
        steps = plan(activations)
        params, feedback, ctx.source = rules.split(len(steps), params)
        outs, zs = forward_pass(_rows(x), steps, params, inplace=True)
        a_L = outs[-1]
        logits = a_L if x.dim() == 2 else a_L.reshape(*x.shape[:-1], a_L.shape[-1])
        ctx.steps = steps
        ctx.set_materialize_grads(False)
        last = steps[-1]
        if last.g is None or last.keeps_z:
            outs[-1] = None  # the output layer's g' does not read a[L]
        feedback = feedback or ()
        y = log_yhat = loss = count = None
        if target is not None:
            y = target.reshape(-1)
            log_yhat, loss, count = softmax_ce_forward(a_L, y)
        ctx.inner = None
        if _no_saved_tensor_hooks():  # a[1..L-1], z[1..L], log yhat: see _no_saved_tensor_hooks
            ctx.inner = (outs[:-1], zs, log_yhat)
            outs, zs, log_yhat = [None] * (len(steps) - 1) + [outs[-1]], [None] * len(steps), None
        ctx.save_for_backward(x, y, log_yhat, count, *params, *outs, *zs, *feedback)
        return logits if target is None else (logits, loss)

    @staticmethod
    def backward(ctx, grad_logits, grad_loss=None):
        steps = ctx.steps
        L = len(steps)
        x, y, log_yhat, count, *saved = ctx.saved_tensors
        params, outs, zs = saved[:2 * L], saved[2 * L:3 * L], saved[3 * L:4 * L]
        feedback = saved[4 * L:] if ctx.source is not None else None
        if ctx.inner is not None:  # held on ctx: this backward lets each go once it has served
            outs, zs, log_yhat = [*ctx.inner[0], outs[-1]], list(ctx.inner[1]), ctx.inner[2]
            if not _KEEP_GRAPH():
                ctx.inner = None  # no retain_graph: the last backward to read them
        needs = ctx.needs_input_grad
        x2 = _rows(x)
        scratch = not torch.is_grad_enabled()
        if not scratch:  # create_graph: rebuild a[i], z[i] as functions of x and the weights
            outs, zs = forward_pass(x2, steps, params)
            if log_yhat is not None:
                log_yhat = torch.log_softmax(outs[-1], 1)
        grad_a, own = None, False
        if grad_logits is not None:
            grad_a = _rows(grad_logits)
        if grad_loss is not None:
            delta_L = softmax_ce_delta(grad_loss, log_yhat, y, count)
            log_yhat = None  # served
            grad_a, own = (delta_L if grad_a is None else grad_a + delta_L), scratch
        if grad_a is None:
            return (None,) * len(needs)
        grads, grad_x = backward_pass(grad_a, own, x2, outs, zs, params[0::2], steps,
                                      (needs[0], *needs[3:]), scratch, feedback=feedback,
                                      direct=ctx.source == rules.DIRECT)
        grad_x = grad_x.reshape(x.shape) if grad_x is not None and needs[0] else None
        return (grad_x, None, None, *grads, *_rule_tail(ctx.source, L))
