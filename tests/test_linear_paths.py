"""linear_act's two Functions: the lean eager one and the general one give the same results."""

import pytest
import torch
from oracle import leaves
from test_activations import TORCH_G
from test_linear import make
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb
from manualbp import native

FROM_OUTPUT = sorted(n for n in TORCH_G if mb.ACTIVATIONS[n].from_output)
FUNCTIONS = {"eager": mb.LinearActEagerFunction, "general": mb.LinearActFunction}


def call(fn, x, W, b, name):
    out = fn.apply(x, W, b, name)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("name", FROM_OUTPUT)
def test_both_functions_pass_gradcheck_and_gradgradcheck(name, lead, fn):
    torch.manual_seed(30)
    inputs = leaves(*make(lead))
    f = FUNCTIONS[fn]
    assert gradcheck(lambda x, W, b: call(f, x, W, b, name), inputs)
    assert gradgradcheck(lambda x, W, b: call(f, x, W, b, name), inputs)


@pytest.mark.parametrize("name", FROM_OUTPUT)
def test_both_functions_give_identical_float32_results(name):
    torch.manual_seed(31)
    x, W, b = make((5,), n_in=6, n_out=4, dtype=torch.float32)
    g = torch.randn(8, 4, 2)[:5, :, 0]  # signed and non-contiguous
    outs, grads = [], []
    for fn in FUNCTIONS.values():
        xs = leaves(x, W, b)
        out = call(fn, *xs, name)
        out.backward(g)
        outs.append(out.detach())
        grads.append([t.grad for t in xs])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for g_eager, g_general in zip(*grads, strict=True):
        torch.testing.assert_close(g_eager, g_general, rtol=0, atol=0)


def grad_fn_name(out):
    return out.grad_fn.name()


def eager_name(python_name, native_node):
    """The node a plain eager float32/float64 call makes: the C++ twin when it is built."""
    if native.lib() is None:
        return python_name
    return f"torch::autograd::CppNode<manualbp::{native_node}>"


def test_linear_act_takes_the_eager_function_only_where_it_applies():
    x, W, b = leaves(*make((3,), dtype=torch.float32))
    relu, gelu = mb.linear_act(x, W, b, "relu"), mb.linear_act(x, W, b, "gelu")
    assert grad_fn_name(relu).startswith(eager_name("LinearActEagerFunction", "LinearActNode"))
    assert grad_fn_name(gelu).startswith(eager_name("LinearActFunction", "LinearActNode"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grad_fn_name(mb.linear_act(x, W, b, "relu")).startswith("LinearActFunction")


def test_mlp_takes_the_eager_function_only_where_it_applies():
    mlp = mb.MLP([4, 5, 3])
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    name = eager_name("MLPEagerFunction", "MLPNode")
    assert grad_fn_name(mlp.loss(x, y)[0]).startswith(name)
    assert grad_fn_name(mlp(x)).startswith(name)
    assert grad_fn_name(mlp(x, trace=mb.Trace())).startswith("MLPFunction")
    assert grad_fn_name(mlp.to(torch.bfloat16)(x.bfloat16())).startswith("MLPFunction")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grad_fn_name(mlp.float()(x)).startswith("MLPFunction")
