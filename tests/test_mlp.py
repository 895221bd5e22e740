import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_same_as_autograd, leaves, noncontiguous_randn
from test_activations import TORCH_G
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb

NAMES = sorted(TORCH_G)
SIZES = [5, 7, 6, 3]


def autograd_twin(mlp: mb.MLP):
    """The same network with nn.Linear + torch's activations, sharing no parameters."""
    layers = []
    for layer in mlp.layers:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        dtype=layer.weight.dtype)
        lin.load_state_dict(layer.state_dict())
        layers += [lin, _Act(layer.activation)]
    return nn.Sequential(*layers)


class _Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, z):
        return TORCH_G[self.name](z)


def params_of(model):
    return [p for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_fused_matches_autograd_values_and_every_gradient(name, bias, lead, dtype):
    torch.manual_seed(0)
    mlp = mb.MLP(SIZES, activation=name, bias=bias, dtype=dtype)
    twin = autograd_twin(mlp)
    x = torch.randn(*lead, SIZES[0], dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = mlp(x), twin(x2)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out, ref, **tol)
    g = noncontiguous_randn(ref.shape, dtype)
    g_before = g.clone()
    out.backward(g)
    assert torch.equal(g, g_before)  # the caller's gradient is never overwritten
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(params_of(mlp), params_of(twin), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol)
        assert p.grad.is_contiguous() and p.grad.dtype == p.dtype


def _fused(activations, bias):
    def f(x, *params):
        it = iter(params)
        flat = []
        for _ in activations:
            flat += [next(it), next(it) if bias else None]
        return mb.MLPFunction.apply(x, None, tuple(activations), None, *flat)
    return f


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck_every_output(name, bias):
    # The output layer carries an activation too, and the hidden a (and z) outputs are part of
    # what is checked, so gradient arriving through them is covered.
    torch.manual_seed(1)
    sizes = [3, 4, 3, 2]
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        params.append(torch.randn(n_out, n_in, dtype=torch.float64))
        if bias:
            params.append(torch.randn(n_out, dtype=torch.float64))
    x = torch.randn(2, 3, dtype=torch.float64)
    x = x + 0.1 * torch.sign(x)
    inputs = leaves(x, *params)
    f = _fused([name, name, name], bias)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_gradcheck_leading_dims_and_frozen_layers():
    torch.manual_seed(2)
    mlp = mb.MLP([3, 4, 2], activation="tanh", dtype=torch.float64)
    mlp.layers[0].weight.requires_grad_(False)
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in mlp.parameters() if p.requires_grad]
    assert gradcheck(lambda x, *_: mlp(x), (x, *params))
    out = mlp(x)
    out.backward(torch.randn_like(out))
    assert mlp.layers[0].weight.grad is None and mlp.layers[0].bias.grad is not None


def test_trace_records_a_and_delta_equal_to_autograd():
    torch.manual_seed(3)
    mlp = mb.MLP([4, 6, 5, 3], activation="sigmoid", dtype=torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    trace = mb.Trace()
    mb.softmax_cross_entropy(mlp(x, trace=trace), y).backward()
    # autograd: keep each z and read its gradient, which is delta by definition
    a, zs = x, []
    for layer in mlp.layers:
        z = F.linear(a, layer.weight, layer.bias)
        z.retain_grad()
        zs.append(z)
        a = TORCH_G[layer.activation](z)
    F.cross_entropy(a, y).backward()
    assert len(trace.a) == len(trace.delta) == 3
    for got_delta, z in zip(trace.delta, zs, strict=True):
        torch.testing.assert_close(got_delta, z.grad)
    torch.testing.assert_close(trace.a[-1], a.detach())


@pytest.mark.parametrize("sizes", [[64, 10], [2, 3]])
def test_no_hidden_layer_is_softmax_regression(sizes):
    mlp = mb.MLP(sizes)
    assert len(mlp.layers) == 1 and mlp.layers[0].activation == "identity"
    twin = autograd_twin(mlp)
    x = torch.randn(5, sizes[0])
    torch.testing.assert_close(mlp(x), twin(x))


def test_same_init_and_keys_as_an_nn_linear_stack():
    torch.manual_seed(4)
    mlp = mb.MLP([8, 16, 4])
    torch.manual_seed(4)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    for p, q in zip(mlp.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert list(mlp.state_dict()) == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert "sizes=[8, 16, 4], activation=relu" in repr(mlp)


def test_empty_batch():
    mlp = mb.MLP([4, 5, 2])
    x = torch.randn(0, 4, requires_grad=True)
    out = mlp(x)
    out.sum().backward()
    assert out.shape == (0, 2) and x.grad.shape == (0, 4)
    assert torch.equal(mlp.layers[0].weight.grad, torch.zeros(5, 4))


def test_per_sample_gradients_with_vmap():
    torch.manual_seed(5)
    mlp = mb.MLP([3, 5, 2], activation="gelu", dtype=torch.float64)
    params = {k: v.detach() for k, v in mlp.named_parameters()}
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))

    def loss(params, x, y):
        logits = torch.func.functional_call(mlp, params, (x.unsqueeze(0),))
        return mb.softmax_cross_entropy(logits, y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    twin = autograd_twin(mlp)
    for i in range(4):
        twin.zero_grad()
        F.cross_entropy(twin(x[i:i + 1]), y[i:i + 1]).backward()
        for (name, g), q in zip(grads.items(), twin.parameters(), strict=True):
            torch.testing.assert_close(g[i], q.grad, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(6)
    mlp = mb.MLP([6, 8, 3], activation="silu")
    twin = autograd_twin(mlp)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    step = torch.compile(lambda x, y: mb.softmax_cross_entropy(mlp(x), y), fullgraph=True,
                         backend=backend)
    loss = step(x, y)
    loss.backward()
    ref = F.cross_entropy(twin(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_autocast_bf16_matches_autograd_under_autocast():
    torch.manual_seed(7)
    mlp = mb.MLP([16, 32, 4], activation="relu")
    twin = autograd_twin(mlp)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = mlp(x), twin(x)
        loss, ref_loss = mb.softmax_cross_entropy(out, y), F.cross_entropy(ref, y)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    loss.backward()
    ref_loss.backward()
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)


def test_checkpoint_and_no_leak():
    from torch.utils.checkpoint import checkpoint

    mlp = mb.MLP([4, 6, 2], activation="gelu")
    x = torch.randn(3, 4)
    checkpoint(mlp, x, use_reentrant=False).sum().backward()
    g = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(x).sum().backward()
    for a, b in zip(g, mlp.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad)
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(3, 4, requires_grad=True)
        ref = weakref.ref(x)
        out = mlp(x, trace=mb.Trace())
        out.sum().backward()
        del x, out
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(("sizes", "match"), [
    ([10], r"at least two widths .* got \[10\]"),
    ([], r"at least two widths .* got \[\]"),
    ([4, 0, 2], r"positive integer, got sizes\[1\] = 0 in"),
    ([4, -3], r"positive integer, got sizes\[1\] = -3 in"),
    ("64,10", r"a list of layer widths like \[64, 128, 10\], got '64,10'"),
    ("64", r"a list of layer widths like \[64, 128, 10\], got '64'"),
    ([4, "a"], r"positive integer, got sizes\[1\] = 'a' \(str\)"),
    ([64.9, 10], r"positive integer, got sizes\[0\] = 64.9 \(float\)"),
    ([64.0, 10], r"positive integer, got sizes\[0\] = 64.0 \(float\)"),
    ([True, True], r"positive integer, got sizes\[0\] = True \(bool\)"),
    ([float("inf"), 3], r"positive integer, got sizes\[0\] = inf \(float\)"),
    ([float("nan"), 3], r"positive integer, got sizes\[0\] = nan \(float\)"),
    ([3, None], r"positive integer, got sizes\[1\] = None \(NoneType\)"),
    (64, r"a list of layer widths like \[64, 128, 10\], got 64"),
])
def test_invalid_sizes_are_refused(sizes, match):
    with pytest.raises(ValueError, match="MLP: expected .*" + match):
        mb.MLP(sizes)


def test_int_like_sizes_are_taken_as_ints():
    import numpy as np

    mlp = mb.MLP((np.int64(3), torch.tensor(4), 2))
    assert mlp.sizes == [3, 4, 2] and all(type(s) is int for s in mlp.sizes)


def test_mlp_input_errors_are_named():
    with pytest.raises(ValueError, match=r"MLP: expected input with last dim in_features=64, "
                                         r"got shape \(2, 8, 8\); flatten it first"):
        mb.MLP([64, 10])(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="MLP: unknown activation 'sigmod'"):
        mb.MLP([4, 4, 2], activation="sigmod")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_cuda_fused_matches_autograd(name, dtype):
    torch.manual_seed(8)
    mlp = mb.MLP([16, 32, 8], activation=name, device="cuda", dtype=dtype)
    twin = autograd_twin(mlp).cuda()
    x = torch.randn(4, 16, device="cuda", dtype=dtype)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-9}
    assert_same_as_autograd(mlp, twin, (x,), rtol=tol[dtype], atol=tol[dtype])


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_folded_loss_matches_autograd_cross_entropy(name, lead):
    torch.manual_seed(9)
    mlp = mb.MLP([4, 6, 3], activation=name, dtype=torch.float64)
    twin = autograd_twin(mlp)
    x = torch.randn(*lead, 4, dtype=torch.float64)
    y = torch.randint(0, 3, lead)
    loss, logits = mlp.loss(x, y)
    ref_logits = twin(x)
    ref = F.cross_entropy(ref_logits.reshape(-1, 3), y.reshape(-1))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits, ref_logits)
    # gradient arriving through the loss and through the logits at once
    g = noncontiguous_randn(logits.shape)
    (2.5 * loss + (logits * g).sum()).backward()
    (2.5 * ref + (ref_logits * g).sum()).backward()
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_folded_loss_gradcheck_and_gradgradcheck():
    torch.manual_seed(10)
    mlp = mb.MLP([3, 4, 3], activation="tanh", dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    params = list(mlp.parameters())

    def f(x, *_):
        loss, logits = mlp.loss(x, y)
        return loss, logits

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("target,error,pattern", [
    (torch.tensor([0, 1, 3]), ValueError, r"MLP.loss: class index 3 at target\[2\].*C=3"),
    (torch.tensor([0, -1, 1]), ValueError, r"class index -1 at target\[1\].*negative.*-100"),
    (torch.tensor([0, 1]), ValueError, r"MLP.loss: expected target of shape \(3,\).*got \(2,\)"),
    (torch.rand(3, 3), TypeError, "MLP.loss: expected integer class indices"),
    (torch.tensor([0, 1, 2], dtype=torch.int32), TypeError,
     r"MLP.loss: expected class indices of dtype torch.int64 .*got torch.int32; pass "
     r"target.long\(\)"),
])
def test_folded_loss_bad_targets(target, error, pattern):
    with pytest.raises(error, match=pattern):
        mb.MLP([2, 3]).loss(torch.randn(3, 2), target)


def test_first_weight_copy_is_not_saved_under_autocast_when_x_needs_no_gradient():
    # Under autocast W[1] reaches the Function as a bf16 copy: saving it would cost real memory
    # and serve only dL/dx, which nobody asked for.
    mlp = mb.MLP([4, 5, 2])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(torch.randn(3, 4))
    shapes = [tuple(t.shape) for t in saved if t.dtype == torch.bfloat16]
    assert (5, 4) not in shapes and (2, 5) in shapes


def test_folded_loss_under_autocast_runs_the_softmax_in_float32():
    torch.manual_seed(11)
    mlp = mb.MLP([16, 32, 4], activation="tanh")
    twin = autograd_twin(mlp)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = mlp.loss(x, y)
        ref_logits = twin(x)
        ref = F.cross_entropy(ref_logits, y)
    assert loss.dtype == ref.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
