"""manualbp: PyTorch layers whose backward pass is the lecture's delta recursion, by hand."""

from manualbp import dp  # DP-SGD glue: noise, Poisson batches, Opacus's accountant
from manualbp.activations import ACTIVATIONS, Activation
from manualbp.chain import Chain
from manualbp.convert import ConversionReport, convert
from manualbp.fused import MLPEagerFunction, MLPFunction, Trace
from manualbp.linear import LinearActEagerFunction, LinearActFunction, linear_act
from manualbp.losses import (
    MSEFunction,
    SigmoidBCEFunction,
    SoftmaxCrossEntropyFunction,
    mse_loss,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
)
from manualbp.mlp import MLP
from manualbp.modules import BCEWithLogitsLoss, CrossEntropyLoss, Linear, MSELoss
from manualbp.per_example import PerExample, per_example
from manualbp.unconvert import unconvert

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Activation",
    "Chain",
    "ConversionReport",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "Linear",
    "LinearActEagerFunction",
    "LinearActFunction",
    "MLPEagerFunction",
    "MLPFunction",
    "MSEFunction",
    "MSELoss",
    "PerExample",
    "SigmoidBCEFunction",
    "SoftmaxCrossEntropyFunction",
    "Trace",
    "convert",
    "dp",
    "linear_act",
    "mse_loss",
    "per_example",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "unconvert",
]
