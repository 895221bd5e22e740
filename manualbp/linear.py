"""One fully connected layer, a = g(a_prev W^T + b), with its backward written by hand.

Slides: a[i] = g(a[i-1] . Theta[i]) and delta[i] = (delta[i+1] . W[i+1]^T) * g'(z[i]).
In torch's layout (W is (n_out, n_in), rows are examples) the layer's share of that is

    delta       = grad_a * g'(z)          (*, n_out)   grad_a = dL/da arrives from above
    grad_W      = delta^T a_prev          (n_out, n_in), summed over every leading dim
    grad_b      = sum(delta)              (n_out,)
    grad_a_prev = delta W                 (*, n_in)    = the layer below's grad_a

A learning rule (manualbp.rules) changes only the last line: grad_a_prev = delta B, where B is
the layer's feedback matrix (for Kolen-Pollack B also gets W's gradient, delta^T a_prev).
The slides' 1/m is not here: it belongs to the loss and reaches us inside grad_a.
"""

import torch
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import ACTIVATIONS, G_INPLACE, check_activation
from manualbp.apply import (
    apply,
    autocast_dtype,
    c_apply,
    cast_all,
    forward_mode,
    tracing,
    with_jvp,
)
from manualbp.native import eager as _native


def delta_from(grad_a: Tensor, t: Tensor, activation: str, inplace: bool = False) -> Tensor:
    """delta = grad_a * g'(.), where t is a (g' from the output) or z, as ACTIVATIONS says.

    inplace: grad_a is a scratch tensor of ours (never the caller's, never under create_graph).
    """
    act = ACTIVATIONS[activation]
    if act.g_prime is None:
        return grad_a
    if act.delta is not None:
        return act.delta(grad_a, t, inplace)
    return grad_a.mul_(act.g_prime(t)) if inplace else grad_a * act.g_prime(t)


@with_jvp
class LinearActFunction(Function):
    """z = a_prev W^T + b, a = g(z); backward is the delta rule above.

    Returns a alone when g' can be read off a (identity, sigmoid, tanh, relu, leaky_relu, elu),
    else (a, z): z is then a real output, saved as such, so double backward stays exact.
    B: a feedback matrix shaped like W (a learning rule), or None (backprop); when B requires
    grad (Kolen-Pollack) its gradient is grad_W.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a_prev: Tensor, W: Tensor, b: Tensor | None, activation: str,
                B: Tensor | None = None, probe=None):
        z = torch.nn.functional.linear(a_prev, W, b)  # (*, n_out)
        act = ACTIVATIONS[activation]
        if act.g_prime is None:
            return z
        a = act.g(z)
        return a if act.from_output else (a, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a_prev, W, _, activation, *rest = inputs
        B = rest[0] if rest else None
        ctx.probe = rest[1] if len(rest) > 1 else None  # manualbp.per_example's
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        # a_prev serves only grad_W (and B's) and W (or B) only grad_a_prev; under autocast
        # each is a real copy.
        need_a_prev, need_W = ctx.needs_input_grad[:2]
        need_W = need_W or _needs_B(ctx.needs_input_grad)
        saved = [a_prev if need_W else None, W if need_a_prev and B is None else None,
                 B if need_a_prev else None]
        if isinstance(output, tuple):
            saved.append(output[1])  # g' needs z
        elif ACTIVATIONS[activation].g_prime is not None:
            saved.append(output)  # g' needs a
        ctx.save_for_backward(*saved)
        ctx.keeps_z = isinstance(output, tuple)
        if forward_mode():
            ctx.save_for_forward(a_prev, W, saved[3] if len(saved) > 3 else None)  # a or z

    @staticmethod
    def _jvp(ctx, d_a_prev, d_W, d_b, _, *_d_B):
        """Forward mode, by hand like backward: dz = da_prev W^T + a_prev dW^T + db and
        da = g'(z) dz, with g' read off a or z as in backward (a rule's B plays no part)."""
        a_prev, W, t = ctx.saved_tensors
        dz = linear_tangent(a_prev, W, d_a_prev, d_W, d_b)
        act = ACTIVATIONS[ctx.activation]
        da = dz if act.g_prime is None else act.g_prime(t) * dz
        return (da, dz) if ctx.keeps_z else da

    @staticmethod
    def backward(ctx, grad_a: Tensor | None, grad_z: Tensor | None = None):
        a_prev, W, B, *t = ctx.saved_tensors
        if grad_a is None:
            delta = grad_z
        else:
            delta = delta_from(grad_a, t[0], ctx.activation) if t else grad_a
            if grad_z is not None:  # someone used z too
                delta = delta + grad_z
        if delta is None:
            return (None,) * len(ctx.needs_input_grad)
        grads = _with_B_grad(delta, a_prev, W, B, ctx.needs_input_grad, ctx.probe)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))  # the probe's


def linear_tangent(a_prev: Tensor, W: Tensor, d_a_prev: Tensor | None, d_W: Tensor | None,
                   d_b: Tensor | None) -> Tensor:
    """dz for z = a_prev W^T + b: da_prev W^T + a_prev dW^T + db (absent tangents are 0)."""
    dz = None
    if d_a_prev is not None:
        dz = d_a_prev.matmul(W.t())
    if d_W is not None:
        term = a_prev.matmul(d_W.t())
        dz = term if dz is None else dz + term
    if dz is None:
        dz = a_prev.new_zeros(*a_prev.shape[:-1], W.shape[0])
    return dz if d_b is None else dz + d_b


def _needs_B(needs) -> bool:
    """Whether a per-layer Function's feedback matrix B (input 4) wants a gradient."""
    return len(needs) > 4 and needs[4]


def _with_B_grad(delta, a_prev, W, B, needs, probe=None):
    """The five gradients of (a_prev, W, b, activation, B): Kolen-Pollack's B gets grad_W."""
    need_B = _needs_B(needs)
    grad_a_prev, grad_W, grad_b = layer_grads(
        delta, a_prev, W, (needs[0], needs[1] or need_B, needs[2]), feedback=B, probe=probe)
    return (grad_a_prev, grad_W if needs[1] else None, grad_b, None,
            grad_W if need_B else None)


def layer_grads(delta: Tensor, a_prev: Tensor | None, W: Tensor | None, needs,
                feedback: Tensor | None = None, probe=None):
    """(grad_a_prev, grad_W, grad_b) from delta (*, n_out), each None where needs says so.

    The one per-layer step of every path (the per-layer Functions and backprop.backward_pass):
    options that change how the error goes down or read a per-example quantity off
    (a_prev, delta) belong here, not in copies of it.
    needs: (a_prev, W, b) wanted, as ctx.needs_input_grad starts. Every leading dim is an
    example, so grad_W and grad_b sum over all of them.
    feedback: the matrix B (shaped like W) a learning rule sends the error down through,
    grad_a_prev = delta B; None sends it through W (backprop). W is not read then.
    probe: a manualbp.per_example layer probe, or None. probe(delta, a_prev) takes this
    layer's per-example share; when it returns True (DP-SGD clipping) the probe forms grad_W
    and grad_b itself once every layer's norm is known, so they are not formed here.
    """
    need_a_prev, need_W, need_b = needs[:3]
    if probe is not None and probe(delta, a_prev):
        need_W = need_b = False
    grad_a_prev = grad_W = grad_b = None
    flat = delta.dim() == 2
    if need_a_prev:
        M = W if feedback is None else feedback  # the one line a learning rule changes
        grad_a_prev = delta.mm(M) if flat else delta.matmul(M)  # (*, n_in)
    if need_W or need_b:
        delta_2d = delta if flat else delta.reshape(-1, delta.shape[-1])
        if need_W:
            rows = a_prev if a_prev.dim() == 2 else a_prev.reshape(-1, a_prev.shape[-1])
            grad_W = delta_2d.t().mm(rows)  # (n_out, n_in) = delta^T a_prev
        if need_b:
            grad_b = delta_2d.sum(0)
    return grad_a_prev, grad_W, grad_b


class LinearActEagerFunction(Function):
    """a = LinearActEagerFunction.apply(a_prev, W, b, activation, B, probe): LinearActFunction's
    delta rule with the least per-call work, for plain eager calls of activations whose g' reads
    a (B: a rule's feedback matrix or None; probe: a manualbp.per_example probe or None).

    Old-style (forward(ctx, ...)), so torch.func and torch.compile take LinearActFunction. g runs
    in place on the fresh z; only a leaves, and it is saved as the output it is, so double
    backward is exact with nothing to recompute.
    """

    @staticmethod
    def forward(ctx, a_prev, W, b, activation, B=None, probe=None):
        z = torch.nn.functional.linear(a_prev, W, b)  # (*, n_out)
        ctx.probe = probe  # manualbp.per_example's, or None
        need_a_prev = ctx.needs_input_grad[0]
        need_W = ctx.needs_input_grad[1] or _needs_B(ctx.needs_input_grad)
        ctx.activation = activation
        down = (W, None) if B is None else (None, B)  # what grad_a_prev is formed with
        if not need_a_prev:
            down = (None, None)
        if activation == "identity":
            ctx.save_for_backward(a_prev if need_W else None, *down, None)
            return z
        g = G_INPLACE.get(activation)
        a = g(z) if g is not None else ACTIVATIONS[activation].g(z)
        ctx.save_for_backward(a_prev if need_W else None, *down, a)
        return a

    @staticmethod
    def backward(ctx, grad_a):
        a_prev, W, B, a = ctx.saved_tensors
        delta = grad_a if a is None else delta_from(grad_a, a, ctx.activation)
        grads = _with_B_grad(delta, a_prev, W, B, ctx.needs_input_grad, ctx.probe)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))  # the probe's


_eager_apply = c_apply(LinearActEagerFunction)


_REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_STRIDED = torch.strided


def check_linear_args(where: str, a_prev: object, W: Tensor, b: Tensor | None) -> None:
    """Raise a clear error for input that F.linear would reject deep inside (or accept wrongly)."""
    if isinstance(a_prev, Tensor) and isinstance(W, Tensor) and not a_prev.is_nested:
        # the usual call, passing every check below, told in the fewest tensor reads (each
        # costs ~30-100 ns): a dense real input of the weight's dtype, in_features matching,
        # a bias shaped like the weight's rows. Anything else meets the checks that explain.
        dtype, ws, xs = W.dtype, W.shape, a_prev.shape
        if (a_prev.dtype is dtype and dtype in _REAL_DTYPES and len(ws) == 2 and xs
                and xs[-1] == ws[1] and a_prev.layout is _STRIDED and W.layout is _STRIDED
                and (b is None or (isinstance(b, Tensor) and b.dtype is dtype
                                   and len(bs := b.shape) == 1 and bs[0] == ws[0]))):
            return
    if not isinstance(a_prev, Tensor):
        got = type(a_prev).__name__
        raise TypeError(f"{where}: expected input to be a torch.Tensor, got {got}")
    check_real_weight(where, W)
    if W.layout != torch.strided:
        raise TypeError(
            f"{where}: expected a dense (strided) weight, got a {_layout_name(W)} tensor; the "
            "hand-written backward forms dense gradients: keep the weight dense"
        )
    if a_prev.is_nested:
        raise TypeError(
            f"{where}: expected a dense input of shape (*, in_features), got a nested tensor; "
            "pad it (x.to_padded_tensor(0.0)) or run the layer on each component"
        )
    if a_prev.layout != torch.strided and a_prev.dim() != 2:
        raise TypeError(
            f"{where}: expected a {_layout_name(a_prev)} input to be 2-D (m, in_features), got "
            f"{a_prev.dim()}-D; pass x.to_dense()"
        )
    if a_prev.dim() == 0:
        raise ValueError(
            f"{where}: expected input of shape (*, in_features={W.shape[1]}), got a 0-dim tensor; "
            "give it at least one dim, e.g. x.reshape(1, -1)"
        )
    if not a_prev.is_floating_point():
        raise TypeError(
            f"{where}: expected a floating-point input, got dtype {a_prev.dtype}; "
            + ("the hand-written backward is real-valued (no conjugates): keep nn.Linear for "
               "complex layers" if a_prev.is_complex() else "convert it with x.float()")
        )
    if a_prev.shape[-1] != W.shape[1]:
        raise ValueError(
            f"{where}: expected input with last dim in_features={W.shape[1]}, "
            f"got shape {tuple(a_prev.shape)}"
            + ("; flatten it first" if a_prev.dim() > 2 and a_prev[0].numel() == W.shape[1] else "")
        )
    if a_prev.dtype != W.dtype and autocast_dtype(a_prev) is None:
        raise TypeError(
            f"{where}: expected input dtype to match the weight's {W.dtype}, got {a_prev.dtype}; "
            f"cast one of them (e.g. x.to({W.dtype}))"
        )
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(
            f"{where}: expected bias of shape ({W.shape[0]},), got {tuple(b.shape)}"
        )
    if b is not None and b.dtype != W.dtype and autocast_dtype(a_prev) is None:
        raise TypeError(
            f"{where}: expected bias dtype to match the weight's {W.dtype}, got {b.dtype}; "
            "cast the module with .to(dtype)"
        )


def check_real_weight(where: str, W: Tensor) -> None:
    """Refuse weights the hand-written backward would get wrong or cannot form (complex, integer).

    F.linear accepts complex tensors, but their gradients need conjugates (a_prev^H, W^H) that
    the delta rule here does not take: autograd's answer and ours would differ silently.
    """
    if not W.is_floating_point():
        what = ("the hand-written backward is real-valued (no conjugates): keep nn.Linear for "
                "complex layers" if W.is_complex() else "cast the module with .float()")
        raise TypeError(f"{where}: expected a real floating-point weight, got dtype {W.dtype}; "
                        + what)


def _layout_name(t: Tensor) -> str:
    return str(t.layout).removeprefix("torch.")


def linear_act(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "identity",
    feedback: Tensor | None = None,
) -> Tensor:
    """a = g(input @ weight.T + bias) with the hand-written backward of LinearActFunction.

    Args:
        input: (*, in_features), any number of leading dims.
        weight: (out_features, in_features), as nn.Linear stores it.
        bias: (out_features,) or None.
        activation: a name in manualbp.ACTIVATIONS (default "identity").
        feedback: a learning rule's B, shaped like weight: the error goes down as delta B
            instead of delta W (feedback alignment: a fixed random B; sign symmetry:
            manualbp.rules.sign_feedback(weight); Kolen-Pollack: a B that requires grad, which
            then receives grad_W). None (default): backprop.

    Returns:
        a: (*, out_features).
    """
    check_activation(activation, "linear_act")
    if weight.dim() != 2:
        raise ValueError(
            f"linear_act: expected weight of shape (out_features, in_features), "
            f"got {tuple(weight.shape)}"
        )
    check_linear_args("linear_act", input, weight, bias)
    if feedback is not None:
        check_feedback("linear_act", feedback, weight)
    return _apply(input, weight, bias, activation, feedback)


def check_feedback(where: str, B: object, W: Tensor) -> None:
    """Raise a clear error for a feedback matrix that cannot stand in for W."""
    if not isinstance(B, Tensor):
        raise TypeError(f"{where}: expected feedback to be a torch.Tensor, got {type(B).__name__}")
    if B.shape != W.shape or B.dtype != W.dtype or B.device != W.device:
        raise ValueError(
            f"{where}: expected feedback shaped like the weight {tuple(W.shape)} ({W.dtype}, "
            f"{W.device}), got {tuple(B.shape)} ({B.dtype}, {B.device})"
        )


def _apply(a_prev: Tensor, W: Tensor, b: Tensor | None, activation: str,
           B: Tensor | None = None, probe=None) -> Tensor:
    """B: a rule's feedback matrix or None; probe: a manualbp.per_example layer probe (the C++
    twin fills its slot, which the block harvests), or None."""
    lib = _native(a_prev)
    if lib is not None:  # the C++ twin, for plain eager float32/float64 calls, any rule's B
        if probe is None:
            return lib.linear_act(a_prev, W, b, activation, B)
        return lib.linear_act(a_prev, W, b, activation, B, probe.slot(lib), probe.clip)
    dtype = autocast_dtype(a_prev)
    if dtype is None:
        if ACTIVATIONS[activation].from_output and not tracing():
            return _eager_apply(a_prev, W, b, activation, B, probe)
        out = apply(LinearActFunction, a_prev, W, b, *_extra(activation, B, probe))
    else:
        a_prev, W, b, B = cast_all(dtype, a_prev, W, b, B)  # B meets delta in that dtype
        with torch.autocast(a_prev.device.type, enabled=False):
            out = apply(LinearActFunction, a_prev, W, b, *_extra(activation, B, probe))
    return out[0] if isinstance(out, tuple) else out


def _extra(activation: str, B: Tensor | None, probe) -> tuple:
    """LinearActFunction's inputs after b: (activation, B[, probe])."""
    return (activation, B) if probe is None else (activation, B, probe)
