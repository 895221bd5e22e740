import pytest
import torch
from oracle import assert_same_as_autograd, noncontiguous_randn
from torch import nn

import manualbp as mb


@pytest.mark.parametrize("bias", [True, False])
def test_same_initialisation_as_nn_linear_under_one_seed(bias):
    torch.manual_seed(7)
    ref = nn.Linear(13, 5, bias=bias, dtype=torch.float64)
    torch.manual_seed(7)
    mine = mb.Linear(13, 5, bias=bias, activation="tanh", dtype=torch.float64)
    assert torch.equal(mine.weight, ref.weight)
    assert (mine.bias is None) == (not bias)
    if bias:
        assert torch.equal(mine.bias, ref.bias)
    assert isinstance(mine, nn.Linear)


def test_state_dict_interchangeable_both_ways():
    ref, mine = nn.Linear(6, 3), mb.Linear(6, 3, activation="relu")
    mine.load_state_dict(ref.state_dict())
    assert torch.equal(mine.weight, ref.weight) and torch.equal(mine.bias, ref.bias)
    mine2 = mb.Linear(6, 3)
    ref.load_state_dict(mine2.state_dict())
    assert torch.equal(mine2.weight, ref.weight)
    assert list(mine.state_dict()) == ["weight", "bias"]


def test_drop_in_gives_nn_linear_values_and_gradients():
    torch.manual_seed(8)
    ref = nn.Linear(5, 4, dtype=torch.float64)
    mine = mb.Linear(5, 4, dtype=torch.float64)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    assert_same_as_autograd(mine, ref, (x,))
    out_m, out_r = mine(x), ref(x)
    g = noncontiguous_randn(out_r.shape)
    out_m.backward(g)
    out_r.backward(g)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


def test_repr_shows_the_activation():
    assert repr(mb.Linear(3, 2, activation="gelu")) == (
        "Linear(in_features=3, out_features=2, bias=True, activation=gelu)"
    )
    assert "activation=identity" in repr(mb.Linear(3, 2, bias=False))


def test_device_and_dtype_factory_kwargs():
    m = mb.Linear(3, 2, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == m.bias.dtype == torch.float64


@pytest.mark.parametrize("x,error,pattern", [
    (torch.randn(32, 28, 28), ValueError,
     r"Linear: expected input with last dim in_features=784, got shape \(32, 28, 28\); "
     r"flatten it first"),
    (torch.randn(4, 5), ValueError,
     r"Linear: expected input with last dim in_features=784, got shape \(4, 5\)"),
    (torch.tensor(1.0), ValueError, "Linear: expected input of shape .*got a 0-dim tensor"),
    (torch.ones(2, 784, dtype=torch.long), TypeError,
     "Linear: expected a floating-point input, got dtype torch.int64"),
    (torch.ones(2, 784, dtype=torch.float64), TypeError,
     "Linear: expected input dtype to match the weight's torch.float32, got torch.float64"),
    ([1.0] * 784, TypeError, "Linear: expected input to be a torch.Tensor, got list"),
])
def test_bad_input_is_named(x, error, pattern):
    with pytest.raises(error, match=pattern):
        mb.Linear(784, 10)(x)


def test_unknown_activation_lists_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'swish'; expected one of: elu, gelu"):
        mb.Linear(3, 2, activation="swish")
    with pytest.raises(ValueError, match="linear_act: unknown activation 'Relu'"):
        mb.linear_act(torch.randn(2, 3), torch.randn(2, 3), None, "Relu")


def test_functional_weight_and_bias_shapes_are_checked():
    with pytest.raises(ValueError, match=r"expected weight of shape \(out_features, in_features\)"):
        mb.linear_act(torch.randn(2, 3), torch.randn(3))
    with pytest.raises(ValueError, match=r"expected bias of shape \(2,\), got \(3,\)"):
        mb.linear_act(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3))
