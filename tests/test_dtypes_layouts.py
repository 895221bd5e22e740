"""Dtypes and layouts the kernels accept but the hand-written backward does not handle: each is
refused with a clear message at every entry point (or, where it is handled, matches autograd)."""

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from torch import nn
from torch.testing import assert_close

import manualbp as mb

D = torch.float64
C = torch.complex128
REAL = "the hand-written backward is real-valued"
pytestmark = [pytest.mark.filterwarnings("ignore:Complex modules:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning"),
              pytest.mark.filterwarnings("ignore:Sparse CSR:UserWarning")]


def _complex_linear():
    lin = mb.Linear(3, 2, dtype=D)
    return lin.to(C)  # Module.to takes complex dtypes; nothing refuses at construction then


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: _complex_linear()(torch.randn(4, 3, dtype=C)), TypeError,
     rf"Linear: expected a real floating-point weight, got dtype torch.complex128; {REAL}"),
    (lambda: _complex_linear()(torch.randn(4, 3, dtype=D)), TypeError,
     r"Linear: expected a real floating-point weight, got dtype torch.complex128"),
    (lambda: mb.Linear(3, 2, dtype=torch.complex64), TypeError,
     rf"Linear: expected a real floating-point dtype, got torch.complex64; {REAL}"),
    (lambda: mb.Linear(3, 2, dtype=torch.int64), TypeError,
     r"Linear: expected a real floating-point dtype, got torch.int64"),
    (lambda: mb.Linear(3.5, 2), ValueError, r"Linear: expected in_features to be a non-negative "
                                            r"int, got 3.5"),
    (lambda: mb.Linear(3, True), ValueError, r"expected out_features .* got True"),
    (lambda: mb.Linear(3, -2), ValueError, r"expected out_features .* got -2"),
    (lambda: mb.linear_act(torch.randn(2, 3, dtype=C), torch.randn(2, 3, dtype=C)), TypeError,
     r"linear_act: expected a real floating-point weight, got dtype torch.complex128"),
    (lambda: mb.linear_act(torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=C)), TypeError,
     r"linear_act: expected a real floating-point weight"),
    (lambda: mb.linear_act(torch.randn(2, 3, dtype=C), torch.randn(2, 3, dtype=D)), TypeError,
     rf"linear_act: expected a floating-point input, got dtype torch.complex128; {REAL}"),
    (lambda: mb.MLP([3, 2]).to(C)(torch.randn(2, 3, dtype=C)), TypeError,
     r"MLP: expected a real floating-point weight, got dtype torch.complex128"),
    (lambda: mb.MLP([3, 2]).to(C).backprop(torch.randn(2, 3, dtype=C), torch.tensor([0, 1])),
     TypeError, r"MLP.backprop: expected a real floating-point weight"),
    (lambda: mb.Linear(3, 2)(torch.nested.nested_tensor(
        [torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)), TypeError,
     r"Linear: expected a dense input of shape \(\*, in_features\), got a nested tensor; pad it"),
    (lambda: mb.MLP([3, 2])(torch.nested.nested_tensor(
        [torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)), TypeError,
     r"MLP: expected a dense input .* got a nested tensor"),
    (lambda: mb.Linear(3, 2)(torch.randn(2, 4, 3).to_sparse()), TypeError,
     r"Linear: expected a sparse_coo input to be 2-D \(m, in_features\), got 3-D; pass "
     r"x.to_dense\(\)"),
    (lambda: _sparse_weight_linear()(torch.randn(4, 3)), TypeError,
     r"Linear: expected a dense \(strided\) weight, got a sparse_coo tensor"),
    (lambda: mb.Linear(3, 2)(torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)),
     TypeError, r"Linear: expected a floating-point input, got dtype torch.qint8"),
    (lambda: _mlp_with(1, "weight", D)(torch.randn(2, 3)), TypeError,
     r"MLP: expected every layer's weight and bias in one dtype, got layers\[1\].weight in "
     r"torch.float64, layers\[0\].weight in torch.float32; cast the network with mlp.to"),
    (lambda: _mlp_with(1, "weight", torch.complex64)(torch.randn(2, 3)), TypeError,
     r"MLP: layers\[1\].weight: expected a real floating-point weight, got dtype "
     r"torch.complex64"),
    (lambda: _mlp_with(1, "bias", D).backprop(torch.randn(2, 3), torch.tensor([0, 1])),
     TypeError, r"MLP.backprop: expected every layer's weight and bias in one dtype, got "
                r"layers\[1\].bias in torch.float64"),
    (lambda: _mlp_with(0, "bias", D)(torch.randn(2, 3)), TypeError,
     r"MLP: expected bias dtype to match the weight's torch.float32, got torch.float64"),
    (lambda: _linear_with_bias(D)(torch.randn(2, 3)), TypeError,
     r"Linear: expected bias dtype to match the weight's torch.float32, got torch.float64"),
])
def test_unsupported_dtypes_and_layouts_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _mlp_with(i, name, dtype):
    mlp = mb.MLP([3, 4, 2])
    setattr(mlp.layers[i], name, nn.Parameter(getattr(mlp.layers[i], name).detach().to(dtype)))
    return mlp


def _linear_with_bias(dtype):
    lin = mb.Linear(3, 2)
    lin.bias = nn.Parameter(lin.bias.detach().to(dtype))
    return lin


def _sparse_weight_linear():
    lin = mb.Linear(3, 2)
    lin.weight = nn.Parameter(lin.weight.detach().to_sparse())
    return lin


def test_convert_leaves_complex_and_integer_linears_to_autograd_and_says_why():
    torch.manual_seed(0)
    frozen_int = nn.Linear(3, 3)
    frozen_int.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.long), requires_grad=False)
    frozen_int.bias = None
    model = nn.Sequential(nn.Linear(3, 3, dtype=C), nn.Tanh(), frozen_int)
    _, report = mb.convert(model, report=True)
    assert report.converted == [] and report.fused == []
    why = dict(report.skipped)
    assert "complex weight (torch.complex128)" in why["0"] and "real-valued" in why["0"]
    assert "weight of dtype torch.int64 is not floating point" in why["2"]
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Tanh


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "channels_last"])
def test_accepted_layouts_match_autograd(activation, layout):
    """What is accepted is right: 2-D sparse inputs and channels_last 4-D inputs."""
    torch.manual_seed(0)
    lin = mb.Linear(3, 2, dtype=D, activation=activation)
    ref = nn.Linear(3, 2, dtype=D)
    ref.load_state_dict(lin.state_dict())
    g_ref = (lambda z: z) if activation == "identity" else getattr(F, activation)
    if layout == "channels_last":
        x = torch.randn(2, 3, 4, 3, dtype=D).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(4, 3, dtype=D)
        x = x.to_sparse() if layout == "sparse_coo" else x.to_sparse_csr()
    out, expected = lin(x), g_ref(ref(x))
    assert_close(out, expected)
    g = noncontiguous_randn(out.shape)
    mine = torch.autograd.grad(out, list(lin.parameters()), g)
    theirs = torch.autograd.grad(expected, list(ref.parameters()), g)
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b)
