"""One fully connected layer, a = g(a_prev W^T + b), with its backward written by hand.

Slides: a[i] = g(a[i-1] . Theta[i]) and delta[i] = (delta[i+1] . W[i+1]^T) * g'(z[i]).
In torch's layout (W is (n_out, n_in), rows are examples) the layer's share of that is

    delta       = grad_a * g'(z)          (*, n_out)   grad_a = dL/da arrives from above
    grad_W      = delta^T a_prev          (n_out, n_in), summed over every leading dim
    grad_b      = sum(delta)              (n_out,)
    grad_a_prev = delta W                 (*, n_in)    = the layer below's grad_a

The slides' 1/m is not here: it belongs to the loss and reaches us inside grad_a.
"""

import torch
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import ACTIVATIONS, G_INPLACE, check_activation
from manualbp.apply import apply, autocast_dtype, c_apply, cast_all, tracing
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


class LinearActFunction(Function):
    """z = a_prev W^T + b, a = g(z); backward is the delta rule above.

    Returns a alone when g' can be read off a (identity, sigmoid, tanh, relu, leaky_relu, elu),
    else (a, z): z is then a real output, saved as such, so double backward stays exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a_prev: Tensor, W: Tensor, b: Tensor | None, activation: str):
        z = torch.nn.functional.linear(a_prev, W, b)  # (*, n_out)
        act = ACTIVATIONS[activation]
        if act.g_prime is None:
            return z
        a = act.g(z)
        return a if act.from_output else (a, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a_prev, W, _, activation = inputs
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        # a_prev serves only grad_W and W only grad_a_prev; under autocast each is a real copy.
        need_a_prev, need_W = ctx.needs_input_grad[:2]
        saved = [a_prev if need_W else None, W if need_a_prev else None]
        if isinstance(output, tuple):
            saved.append(output[1])  # g' needs z
        elif ACTIVATIONS[activation].g_prime is not None:
            saved.append(output)  # g' needs a
        ctx.save_for_backward(*saved)

    @staticmethod
    def backward(ctx, grad_a: Tensor | None, grad_z: Tensor | None = None):
        a_prev, W, *t = ctx.saved_tensors
        if grad_a is None:
            delta = grad_z
        else:
            delta = delta_from(grad_a, t[0], ctx.activation) if t else grad_a
            if grad_z is not None:  # someone used z too
                delta = delta + grad_z
        if delta is None:
            return None, None, None, None
        return (*layer_grads(delta, a_prev, W, ctx.needs_input_grad), None)


def layer_grads(delta: Tensor, a_prev: Tensor | None, W: Tensor | None, needs):
    """(grad_a_prev, grad_W, grad_b) from delta (*, n_out), each None where needs says so.

    The one per-layer step of every path (the per-layer Functions and backprop.backward_pass):
    options that change how the error goes down or read a per-example quantity off
    (a_prev, delta) belong here, not in copies of it.
    needs: (a_prev, W, b) wanted, as ctx.needs_input_grad starts. Every leading dim is an
    example, so grad_W and grad_b sum over all of them.
    """
    need_a_prev, need_W, need_b = needs[:3]
    grad_a_prev = grad_W = grad_b = None
    flat = delta.dim() == 2
    if need_a_prev:
        grad_a_prev = delta.mm(W) if flat else delta.matmul(W)  # (*, n_in)
    if need_W or need_b:
        delta_2d = delta if flat else delta.reshape(-1, delta.shape[-1])
        if need_W:
            rows = a_prev if a_prev.dim() == 2 else a_prev.reshape(-1, a_prev.shape[-1])
            grad_W = delta_2d.t().mm(rows)  # (n_out, n_in) = delta^T a_prev
        if need_b:
            grad_b = delta_2d.sum(0)
    return grad_a_prev, grad_W, grad_b


class LinearActEagerFunction(Function):
    """a = LinearActEagerFunction.apply(a_prev, W, b, activation): LinearActFunction's delta rule
    with the least per-call work, for plain eager calls of activations whose g' reads a.

    Old-style (forward(ctx, ...)), so torch.func and torch.compile take LinearActFunction. g runs
    in place on the fresh z; only a leaves, and it is saved as the output it is, so double
    backward is exact with nothing to recompute.
    """

    @staticmethod
    def forward(ctx, a_prev, W, b, activation):
        z = torch.nn.functional.linear(a_prev, W, b)  # (*, n_out)
        need_a_prev, need_W = ctx.needs_input_grad[:2]
        ctx.activation = activation
        if activation == "identity":
            ctx.save_for_backward(a_prev if need_W else None, W if need_a_prev else None, None)
            return z
        g = G_INPLACE.get(activation)
        a = g(z) if g is not None else ACTIVATIONS[activation].g(z)
        ctx.save_for_backward(a_prev if need_W else None, W if need_a_prev else None, a)
        return a

    @staticmethod
    def backward(ctx, grad_a):
        a_prev, W, a = ctx.saved_tensors
        delta = grad_a if a is None else delta_from(grad_a, a, ctx.activation)
        return (*layer_grads(delta, a_prev, W, ctx.needs_input_grad), None)


_eager_apply = c_apply(LinearActEagerFunction)


def check_linear_args(where: str, a_prev: object, W: Tensor, b: Tensor | None) -> None:
    """Raise a clear error for input that F.linear would reject deep inside (or accept wrongly)."""
    if not isinstance(a_prev, Tensor):
        got = type(a_prev).__name__
        raise TypeError(f"{where}: expected input to be a torch.Tensor, got {got}")
    if a_prev.dim() == 0:
        raise ValueError(
            f"{where}: expected input of shape (*, in_features={W.shape[1]}), got a 0-dim tensor; "
            "give it at least one dim, e.g. x.reshape(1, -1)"
        )
    if not a_prev.is_floating_point():
        raise TypeError(
            f"{where}: expected a floating-point input, got dtype {a_prev.dtype}; "
            "convert it with x.float()"
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


def linear_act(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "identity"
) -> Tensor:
    """a = g(input @ weight.T + bias) with the hand-written backward of LinearActFunction.

    Args:
        input: (*, in_features), any number of leading dims.
        weight: (out_features, in_features), as nn.Linear stores it.
        bias: (out_features,) or None.
        activation: a name in manualbp.ACTIVATIONS (default "identity").

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
    return _apply(input, weight, bias, activation)


def _apply(a_prev: Tensor, W: Tensor, b: Tensor | None, activation: str) -> Tensor:
    lib = _native(a_prev)  # the C++ twin, for plain eager float32/float64 calls
    if lib is not None:
        return lib.linear_act(a_prev, W, b, activation)
    dtype = autocast_dtype(a_prev)
    if dtype is None:
        if ACTIVATIONS[activation].from_output and not tracing():
            return _eager_apply(a_prev, W, b, activation)
        out = apply(LinearActFunction, a_prev, W, b, activation)
    else:
        a_prev, W, b = cast_all(dtype, a_prev, W, b)
        with torch.autocast(a_prev.device.type, enabled=False):
            out = apply(LinearActFunction, a_prev, W, b, activation)
    return out[0] if isinstance(out, tuple) else out
