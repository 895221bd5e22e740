"""Activation functions g and their hand-written derivatives g'.

The slides' neuron is a = g(z), z = a_prev . Theta. Backpropagation needs g'(z) for
delta = grad_a * g'(z). For identity, sigmoid, tanh, relu, leaky_relu and elu, g' is a function
of the output a alone, so a layer saves a (which it returns anyway) and never z. For softplus,
silu, gelu and gelu_tanh it is not, and the layer keeps z.

Each entry holds torch's own g (so values equal torch's), our g_prime, and from_output, which
says whether g_prime takes a (True) or z (False).
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0  # torch's softplus is linear (g' = 1) above this


class Activation(NamedTuple):
    """g, its derivative g_prime, whether g_prime reads the output a (else z), and optionally
    delta(grad_a, t, inplace): grad_a * g'(t) in fewer kernels (the hot path of backward)."""

    g: Callable[[Tensor], Tensor]
    g_prime: Callable[[Tensor], Tensor] | None  # None: identity, g' = 1
    from_output: bool
    delta: Callable[[Tensor, Tensor, bool], Tensor] | None = None


def _identity(z: Tensor) -> Tensor:
    return z


def _sigmoid_prime(a: Tensor) -> Tensor:
    return a * (1 - a)  # sigma' = sigma (1 - sigma)


def _tanh_prime(a: Tensor) -> Tensor:
    return 1 - a * a  # tanh' = 1 - tanh^2


def _sigmoid_delta(grad_a: Tensor, a: Tensor, inplace: bool) -> Tensor:
    # grad_a * a (1 - a) in one kernel: aten's sigmoid_backward is exactly that product (it is
    # no autograd formula), written over grad_a when grad_a is our own scratch buffer.
    if inplace:
        return torch.ops.aten.sigmoid_backward.grad_input(grad_a, a, grad_input=grad_a)
    return torch.ops.aten.sigmoid_backward(grad_a, a)


def _tanh_delta(grad_a: Tensor, a: Tensor, inplace: bool) -> Tensor:
    # grad_a * (1 - a^2) in one kernel (aten's tanh_backward), in place on our own scratch.
    if inplace:
        return torch.ops.aten.tanh_backward.grad_input(grad_a, a, grad_input=grad_a)
    return torch.ops.aten.tanh_backward(grad_a, a)


def _relu_delta(grad_a: Tensor, a: Tensor, inplace: bool) -> Tensor:
    # grad_a where a > 0, else 0: the product with relu's 0/1 derivative as one masked-copy
    # kernel (aten's threshold_backward is exactly that select; it is no autograd formula).
    if inplace:  # written over grad_a itself: no new (m, n) buffer
        return torch.ops.aten.threshold_backward.grad_input(grad_a, a, 0, grad_input=grad_a)
    return torch.ops.aten.threshold_backward(grad_a, a, 0)


def _relu_prime(a: Tensor) -> Tensor:
    # a >= 0, so sign(a) is 1 where z > 0 and 0 elsewhere (0 at the kink, as torch). One float
    # kernel: on CPU a bool mask (a > 0) and its cast cost several times more.
    return torch.sign(a)


def _leaky_relu_prime(a: Tensor) -> Tensor:
    return torch.where(a > 0, 1.0, torch.full_like(a, 0.01))  # a > 0 exactly when z > 0


def _elu_prime(a: Tensor) -> Tensor:
    # z > 0: 1; z <= 0: d/dz (e^z - 1) = e^z = a + 1, which is <= 1 exactly there
    return (a + 1).clamp(max=1.0)


def _softplus_prime(z: Tensor) -> Tensor:
    return torch.where(z > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(z))


def _silu_prime(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))  # d/dz z sigma(z)


def _gelu_prime(z: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(z / _SQRT_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf  # d/dz z Phi(z)


def _gelu_tanh_prime(z: Tensor) -> Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
    du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du


def _gelu_tanh(z: Tensor) -> Tensor:
    return F.gelu(z, approximate="tanh")


# For the activations whose g' needs z, grad_a * g'(z) in one kernel: aten's *_backward kernels
# compute exactly that product (the formulas above, fused), written over grad_a when it is our
# own scratch buffer. They are differentiable, so double backward stays exact (silu_backward
# is not, so silu keeps its formula).
def _softplus_delta(grad_a: Tensor, z: Tensor, inplace: bool) -> Tensor:
    op = torch.ops.aten.softplus_backward
    if inplace:
        return op.grad_input(grad_a, z, 1.0, _SOFTPLUS_THRESHOLD, grad_input=grad_a)
    return op(grad_a, z, 1.0, _SOFTPLUS_THRESHOLD)


def _gelu_delta_of(approximate: str):
    def delta(grad_a: Tensor, z: Tensor, inplace: bool) -> Tensor:
        op = torch.ops.aten.gelu_backward
        if inplace:
            return op.grad_input(grad_a, z, approximate=approximate, grad_input=grad_a)
        return op(grad_a, z, approximate=approximate)

    return delta


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(_identity, None, True),
    "sigmoid": Activation(torch.sigmoid, _sigmoid_prime, True, _sigmoid_delta),
    "tanh": Activation(torch.tanh, _tanh_prime, True, _tanh_delta),
    "relu": Activation(torch.relu, _relu_prime, True, _relu_delta),
    "leaky_relu": Activation(F.leaky_relu, _leaky_relu_prime, True),
    "elu": Activation(F.elu, _elu_prime, True),
    "softplus": Activation(F.softplus, _softplus_prime, False, _softplus_delta),
    "silu": Activation(F.silu, _silu_prime, False),  # aten silu_backward has no derivative
    "gelu": Activation(F.gelu, _gelu_prime, False, _gelu_delta_of("none")),
    "gelu_tanh": Activation(_gelu_tanh, _gelu_tanh_prime, False, _gelu_delta_of("tanh")),
}
ACTIVATIONS["logistic"] = ACTIVATIONS["sigmoid"]  # the slides' name

# g applied in place, for a fresh z that nothing else reads (saves an allocation per layer).
G_INPLACE = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_,
             "logistic": torch.sigmoid_}


def check_activation(name: object, where: str) -> str:
    """Return name if it is a known activation, else raise naming the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        choices = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"{where}: unknown activation {name!r}; expected one of: {choices}")
    return name
