"""The whole network's backward in one hand-written pass: the slides' algorithm as written.

Forward computes a[1..L] layer by layer; backward starts from delta[L] (what the loss sends down)
and runs the recursion

    grad_W[i]  = delta[i]^T a[i-1]                       (n_i, n_{i-1})
    grad_b[i]  = sum(delta[i])                           (n_i,)
    delta[i-1] = (delta[i] W[i]) * g'(z[i-1])            (m, n_{i-1})

for i = L..1, producing every gradient in one autograd node instead of one node per op. The
hidden a[i] (and z[i] where g' needs z) are returned as extra outputs of the Function and saved as
outputs, not as intermediates, so double backward and saved-tensor hooks see them correctly.
"""

import torch
from torch import Tensor, nn
from torch.autograd import Function

from manualbp.activations import ACTIVATIONS, check_activation
from manualbp.apply import apply, autocast_dtype, cast_all
from manualbp.linear import check_linear_args, delta_from
from manualbp.modules import Linear


class Trace:
    """Records, detached, a[i] (in forward) and delta[i] = dL/dz[i] (in backward), i = 1..L.

    Pass one to MLP.forward(x, trace=...) in eager mode; a[0] is the first hidden layer, a[-1]
    the output, and delta is in the same order once backward has run.
    """

    def __init__(self) -> None:
        self.a: list[Tensor] = []
        self.delta: list[Tensor] = []


def _layout(activations: tuple[str, ...]) -> list[tuple[int, int | None, int | None]]:
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
    return layout


class MLPFunction(Function):
    """a_L, *extras = MLPFunction.apply(x, activations, trace, W1, b1, ..., WL, bL).

    activations: tuple of L names, one per layer (MLP passes identity for the last). Biases may
    be None. extras are the hidden a[i] and the z[i] whose g' needs z, laid out by _layout.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, activations: tuple[str, ...], trace: Trace | None, *params):
        a = x.reshape(-1, x.shape[-1])  # (m, n_0): every leading dim is an example
        extras: list[Tensor] = []
        L = len(activations)
        for i, activation in enumerate(activations):
            W, b = params[2 * i], params[2 * i + 1]
            z = torch.addmm(b, a, W.t()) if b is not None else a.mm(W.t())  # (m, n_i)
            act = ACTIVATIONS[activation]
            a = z if act.g_prime is None else act.g(z)
            if trace is not None:
                trace.a.append(a.detach().reshape(*x.shape[:-1], -1))
            if i < L - 1:
                extras.append(a)
            if act.g_prime is not None and not act.from_output:
                extras.append(z)
        return (a.reshape(*x.shape[:-1], a.shape[-1]), *extras)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, activations, trace, *params = inputs
        ctx.activations = activations
        ctx.trace = trace
        ctx.set_materialize_grads(False)
        # a[L] is saved only when the output layer's own g' reads it.
        ctx.save_last = _layout(activations)[-1][2] == 0
        last = [output[0]] if ctx.save_last else []
        ctx.save_for_backward(x, *params[0::2], *output[1:], *last)

    @staticmethod
    def backward(ctx, *grad_out: Tensor | None):
        activations = ctx.activations
        L = len(activations)
        x, *saved = ctx.saved_tensors
        weights = saved[:L]
        out = [saved[-1] if ctx.save_last else None, *saved[L:len(saved) - ctx.save_last]]
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (2 * L)
        deltas: list[Tensor] = []
        grad_x = None
        layout = _layout(activations)
        grad_a = grad_out[0]  # dL/da[L]
        if grad_a is not None:
            grad_a = grad_a.reshape(-1, weights[-1].shape[0])
        for i in range(L - 1, -1, -1):  # layer i + 1 in the slides' numbering
            a_idx, z_idx, t_idx = layout[i]
            if i < L - 1 and grad_out[a_idx] is not None:  # someone used a hidden a
                grad_a = grad_out[a_idx] if grad_a is None else grad_a + grad_out[a_idx]
            delta = None
            if grad_a is not None:
                t = out[t_idx].reshape(grad_a.shape) if t_idx is not None else None
                delta = delta_from(grad_a, t, activations[i])
            if z_idx is not None and grad_out[z_idx] is not None:
                delta = grad_out[z_idx] if delta is None else delta + grad_out[z_idx]
            grad_a = None
            if delta is None:  # no gradient reached this layer
                continue
            deltas.append(delta)
            a_prev = out[layout[i - 1][0]] if i > 0 else x.reshape(-1, x.shape[-1])
            if needs[3 + 2 * i]:
                grads[2 * i] = delta.t().mm(a_prev)  # grad_W = delta^T a_prev, (n_i, n_{i-1})
            if needs[4 + 2 * i]:
                grads[2 * i + 1] = delta.sum(0)  # grad_b = sum(delta)
            if i > 0 or needs[0]:
                grad_a = delta.mm(weights[i])  # dL/da[i-1] = delta W
        if grad_a is not None and needs[0]:
            grad_x = grad_a.reshape(x.shape)
        if ctx.trace is not None:
            lead = x.shape[:-1]
            ctx.trace.delta = [d.detach().reshape(*lead, -1) for d in reversed(deltas)]
        return (grad_x, None, None, *grads)


class MLP(nn.Module):
    """Fully connected network a[i] = g(a[i-1] W[i]^T + b[i]), trained by the fused backward.

    Hidden layers use `activation`; the last layer is linear and returns logits, for a softmax
    or logistic output in the loss. sizes=[n_in, n_out] is the slides' single layer of neurons:
    logistic/softmax regression.

    Args:
        sizes: layer widths [n_0, n_1, ..., n_L], at least two, each > 0.
        activation: name in manualbp.ACTIVATIONS for the hidden layers (default "relu").
        bias: give every layer a bias (default True).
        device, dtype: factory kwargs for the parameters.

    Attributes:
        layers: nn.ModuleList of L manualbp.Linear (state_dict keys layers.{i}.weight/.bias),
            initialised exactly as nn.Linear would be under the same seed.
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        sizes = _check_sizes(sizes)
        self.sizes = sizes
        self.activation = check_activation(activation, "MLP")
        acts = [activation] * (len(sizes) - 2) + ["identity"]
        self.layers = nn.ModuleList(
            Linear(n_in, n_out, bias=bias, activation=act, device=device, dtype=dtype)
            for n_in, n_out, act in zip(sizes[:-1], sizes[1:], acts, strict=True)
        )

    def forward(self, x: Tensor, trace: Trace | None = None) -> Tensor:
        first = self.layers[0]
        check_linear_args("MLP", x, first.weight, first.bias)
        params: list[Tensor | None] = []
        activations = []
        for layer in self.layers:
            params += [layer.weight, layer.bias]
            activations.append(layer.activation)
        dtype = autocast_dtype(x)
        if dtype is None:
            return apply(MLPFunction, x, tuple(activations), trace, *params)[0]
        x, *params = cast_all(dtype, x, *params)
        with torch.autocast(x.device.type, enabled=False):
            return apply(MLPFunction, x, tuple(activations), trace, *params)[0]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation}"


def _check_sizes(sizes) -> list[int]:
    try:
        sizes = [int(s) for s in sizes]
        ok = len(sizes) >= 2 and all(s > 0 for s in sizes)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"MLP: expected sizes to be at least two positive widths like [64, 128, 10], "
            f"got {sizes!r}"
        )
    return sizes
