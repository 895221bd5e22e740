"""manualbp.MLP: a fully connected network trained by one hand-written backward pass."""

import torch
from torch import Tensor, nn

from manualbp.activations import check_activation
from manualbp.apply import apply, autocast_dtype, cast_all
from manualbp.fused import MLPFunction, Trace
from manualbp.linear import check_linear_args
from manualbp.loss_checks import check_mlp_target
from manualbp.modules import Linear


class MLP(nn.Module):
    """Fully connected network a[i] = g(a[i-1] W[i]^T + b[i]) with the fused backward.

    Hidden layers use `activation`; the last layer is linear and returns logits, for a softmax
    or logistic output in the loss. sizes=[n_in, n_out] is the slides' single layer of neurons:
    logistic/softmax regression. The whole stack is one autograd node (MLPFunction), and
    `loss(x, y)` folds the softmax cross-entropy output layer into that node too.

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
        """Logits a[L], shape (*, n_L), for x of shape (*, n_0)."""
        return self._run(x, None, trace)[0]

    def loss(self, x: Tensor, target: Tensor, trace: Trace | None = None) -> tuple[Tensor, Tensor]:
        """(mean softmax cross-entropy, logits) with delta[L] = (yhat - y) / m folded in.

        Same value and gradients as softmax_cross_entropy(self(x), target), in one node.

        Args:
            x: (*, n_0). target: class indices of shape (*), each in [0, n_L).
        """
        out = self._run(x, check_mlp_target(x, target, self.sizes[-1]), trace)
        return out[-1], out[0]

    def _run(self, x: Tensor, target: Tensor | None, trace: Trace | None):
        params: list[Tensor | None] = []
        activations = []
        for layer in self.layers:
            params += (layer.weight, layer.bias)
            activations.append(layer.activation)
        check_linear_args("MLP", x, params[0], params[1])
        activations = tuple(activations)
        dtype = autocast_dtype(x)
        if dtype is None:
            return apply(MLPFunction, x, target, activations, trace, *params)
        x, *params = cast_all(dtype, x, *params)
        with torch.autocast(x.device.type, enabled=False):
            out = apply(MLPFunction, x, target, activations, trace, *params)
        return out  # the folded loss is float32 already, like F.cross_entropy under autocast

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
