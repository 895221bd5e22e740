"""manualbp.Linear: a drop-in for nn.Linear whose backward is written by hand."""

from torch import Tensor, nn

from manualbp.activations import check_activation
from manualbp.linear import _apply, check_linear_args
from manualbp.losses import mse_loss, sigmoid_binary_cross_entropy, softmax_cross_entropy
from manualbp.per_example import _ACTIVE


class Linear(nn.Linear):
    """Fully connected layer a = g(x W^T + b), optionally fused with its activation g.

    A subclass of nn.Linear: same constructor, parameters, initialisation (torch's own
    reset_parameters), state_dict keys, and isinstance(m, nn.Linear) holds, so weight-init loops
    and optimizers treat it as a Linear. Only the backward differs: LinearActFunction's
    hand-written delta rule instead of autograd's graph of addmm + activation.

    Args:
        in_features: size of each input sample, n_in.
        out_features: size of each output sample, n_out.
        bias: learn an additive bias b (default True).
        activation: name in manualbp.ACTIVATIONS applied to z (default "identity": plain Linear).
        device, dtype: factory kwargs, as nn.Linear.

    Attributes:
        weight: (out_features, in_features), U(-1/sqrt(n_in), 1/sqrt(n_in)) as nn.Linear.
        bias: (out_features,) or None, same init.

    Shape:
        input (*, in_features) -> output (*, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "identity",
        device=None,
        dtype=None,
    ) -> None:
        self.activation = check_activation(activation, "Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        W, b = self.weight, self.bias
        probe = _ACTIVE[0].probe(self, input, W, b) if _ACTIVE else None  # per_example block
        try:
            return _apply(input, W, b, self.activation, probe)
        except Exception as error:  # checked only once F.linear has refused the input
            refused = error
        check_linear_args("Linear", input, W, b)  # says plainly what is wrong with the input
        raise refused  # the input was fine: the error is about something else

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss (same arguments and buffers) computed by softmax_cross_entropy."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return softmax_cross_entropy(input, target, self.weight, self.ignore_index,
                                     self.reduction, self.label_smoothing)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """nn.BCEWithLogitsLoss (same arguments and buffers) computed by the hand-written delta."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sigmoid_binary_cross_entropy(input, target, self.weight, self.reduction,
                                            self.pos_weight)


class MSELoss(nn.MSELoss):
    """nn.MSELoss (same arguments) computed by mse_loss's hand-written delta."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, self.reduction)
