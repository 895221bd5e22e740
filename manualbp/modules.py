"""manualbp.Linear: a drop-in for nn.Linear whose backward is written by hand."""

import operator

import torch
from torch import Tensor, nn

from manualbp.activations import check_activation
from manualbp.linear import _apply, check_linear_args
from manualbp.losses import mse_loss, sigmoid_binary_cross_entropy, softmax_cross_entropy
from manualbp.per_example import _ACTIVE
from manualbp.rules import DFA, attach, check_rule, feedback_of


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
        rule: how the error goes down (manualbp.rules): "backprop" (default), "feedback_alignment"
            ("fa"), "sign_symmetry" ("ss", "usf") or "kolen_pollack" ("kp"). Direct feedback
            alignment needs the whole network: mb.MLP(..., rule="dfa").

    Attributes:
        weight: (out_features, in_features), U(-1/sqrt(n_in), 1/sqrt(n_in)) as nn.Linear.
        bias: (out_features,) or None, same init.
        rule: the rule's full name.
        feedback: (out_features, in_features), the rule's B, drawn after weight and bias (so
            they are nn.Linear's under the same seed): a buffer for feedback alignment (same
            init as weight) and sign symmetry (sign(W) * s of the latest forward, s = rms(W) at
            construction), a Parameter for Kolen-Pollack (the optimizer steps it with W's
            gradient). Absent for backprop.

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
        rule: str = "backprop",
    ) -> None:
        self.activation = check_activation(activation, "Linear")
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not hasattr(n, "__index__") or operator.index(n) < 0:
                raise ValueError(f"Linear: expected {name} to be a non-negative int, got {n!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(
                f"Linear: expected a real floating-point dtype, got {dtype}; the hand-written "
                "backward is real-valued: keep nn.Linear for complex layers"
            )
        rule = check_rule(rule, "Linear")
        if rule == DFA:
            raise ValueError(
                "Linear: rule 'direct_feedback_alignment' sends every hidden layer the output "
                "layer's error, so it needs the whole network; use mb.MLP(sizes, rule='dfa')"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        attach(self, rule)

    rule = "backprop"  # class default: layers that convert() swapped in carry none of their own

    def forward(self, input: Tensor) -> Tensor:
        own = self._parameters  # direct: nn.Module.__getattr__ costs ~0.6 us a read
        W = own.get("weight")
        if W is None:  # a parametrization's property, or a plain tensor set in its place
            W = self.weight
        b = own["bias"] if "bias" in own else self.bias
        if W.is_complex() or getattr(input, "is_nested", False):
            # F.linear runs on these, and the backward would be wrong or fail deep: refuse here
            check_linear_args("Linear", input, W, b)
        B = None if self.rule == "backprop" or not torch.is_grad_enabled() else self._feedback()
        probe = _ACTIVE[0].probe(self, input, W, b) if _ACTIVE else None  # per_example block
        try:
            return _apply(input, W, b, self.activation, B, probe)
        except Exception as error:  # checked only once F.linear has refused the input
            refused = error
        check_linear_args("Linear", input, W, b)  # says plainly what is wrong with the input
        raise refused  # the input was fine: the error is about something else

    def _feedback(self) -> Tensor:
        if self.rule == DFA:
            raise ValueError(
                "Linear: this layer belongs to an MLP trained by direct feedback alignment, "
                "whose error reaches it from the output layer; call the MLP, not the layer"
            )
        return feedback_of(self)

    def extra_repr(self) -> str:
        rule = "" if self.rule == "backprop" else f", rule={self.rule}"
        return f"{super().extra_repr()}, activation={self.activation}{rule}"


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss (same arguments and buffers) computed by softmax_cross_entropy."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        buffers = self._buffers  # direct: nn.Module.__getattr__ costs ~0.6 us a read
        weight = buffers["weight"] if "weight" in buffers else self.weight
        return softmax_cross_entropy(input, target, weight, self.ignore_index,
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
