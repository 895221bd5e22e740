"""ONNX export of converted models and MLP, with both of torch's exporters; ONNX Runtime judges
the outputs against the original model's. Skips only where onnx / onnxruntime are missing."""

import io

import pytest
import torch
from torch import nn

import manualbp as mb

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# one module per manualbp activation (identity: a Linear followed by nothing to fuse)
ACTIVATION_MODULES = {
    "relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "silu": nn.SiLU(),
    "leaky_relu": nn.LeakyReLU(), "elu": nn.ELU(), "softplus": nn.Softplus(), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"), "identity": nn.Identity(),
}


def _export(model, x, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        return program.model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    return f.getvalue()


def _run_onnx(data, x):
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _every_activation():
    torch.manual_seed(0)
    layers = []
    for act in ACTIVATION_MODULES.values():
        layers += [nn.Linear(6, 6), act]
    return nn.Sequential(*layers, nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_converted_model_exports_every_activation(dynamo):
    model = _every_activation()
    x = torch.randn(4, 6) * 2
    with torch.no_grad():
        expected = model(x)
    _, report = mb.convert(model, report=True)
    assert len(report.fused) == len(ACTIVATION_MODULES) - 1  # all but identity fused
    out = _run_onnx(_export(model, x, dynamo), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("activation", "dynamo"),
                         [("gelu", False), ("softplus", False), ("gelu", True)])
def test_mlp_exports(activation, dynamo):
    torch.manual_seed(0)
    mlp = mb.MLP([6, 8, 8, 3], activation=activation).eval()
    x = torch.randn(4, 6) * 2
    with torch.no_grad():
        expected = torch.nn.functional.linear(  # the same network in plain torch ops
            getattr(torch.nn.functional, activation)(torch.nn.functional.linear(
                getattr(torch.nn.functional, activation)(torch.nn.functional.linear(
                    x, mlp.layers[0].weight, mlp.layers[0].bias)),
                mlp.layers[1].weight, mlp.layers[1].bias)),
            mlp.layers[2].weight, mlp.layers[2].bias)
    out = _run_onnx(_export(mlp, x, dynamo), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_jit_trace_records_torch_ops_and_keeps_gradients_right():
    """torch.jit.trace takes the same path as the TorchScript exporter: plain ops, right values
    and (autograd's) right gradients."""
    model = _every_activation().double()
    ref = nn.Sequential(*[m for m in model]).double()  # same modules, before conversion
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = ref(x)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, list(ref.parameters()), g)
    mb.convert(model)
    traced = torch.jit.trace(model, (x,))
    out = traced(x)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out, list(traced.parameters()), g), grads, strict=True):
        torch.testing.assert_close(a, b)
