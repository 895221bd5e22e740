import pytest
import torch
import torch.nn.functional as F

from manualbp import ACTIVATIONS

TORCH_G = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "logistic": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "elu": lambda z: F.elu(z, 1.0),
    "softplus": lambda z: F.softplus(z, 1.0),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


def test_every_required_activation_is_there():
    assert set(ACTIVATIONS) == set(TORCH_G)
    assert ACTIVATIONS["logistic"] is ACTIVATIONS["sigmoid"]


def _grid():
    # Wide and saturating ranges, the kink at 0 and softplus's threshold at 20 included.
    return torch.cat([
        torch.linspace(-30, 30, 601, dtype=torch.float64),
        torch.tensor([0.0, -1e-12, 1e-12, 19.999, 20.0, 20.001], dtype=torch.float64),
    ])


@pytest.mark.parametrize("name", sorted(TORCH_G))
def test_g_equals_torch(name):
    z = _grid()
    torch.testing.assert_close(ACTIVATIONS[name].g(z), TORCH_G[name](z), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TORCH_G))
def test_g_prime_equals_autograd_derivative(name):
    z = _grid().requires_grad_()
    (expected,) = torch.autograd.grad(TORCH_G[name](z).sum(), z)
    act = ACTIVATIONS[name]
    with torch.no_grad():
        a = act.g(z)
        t = a if act.from_output else z
        got = torch.ones_like(z) if act.g_prime is None else act.g_prime(t)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu"])
def test_g_prime_reads_the_output_where_math_allows(name):
    assert ACTIVATIONS[name].from_output


@pytest.mark.parametrize("name", ["softplus", "silu", "gelu", "gelu_tanh"])
def test_g_prime_reads_z_otherwise(name):
    assert not ACTIVATIONS[name].from_output


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", sorted(n for n in TORCH_G if ACTIVATIONS[n].delta is not None))
def test_fast_delta_equals_grad_times_g_prime(name, inplace):
    act = ACTIVATIONS[name]
    z = _grid()
    a = act.g(z)
    grad_a = torch.randn_like(z)
    expected = grad_a * act.g_prime(a)
    got = act.delta(grad_a.clone() if inplace else grad_a, a, inplace)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
