import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_same_as_autograd, leaves, noncontiguous_randn
from test_activations import TORCH_G
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb

NAMES = sorted(TORCH_G)
LEADING = [(), (3,), (2, 3)]


def reference(x, W, b, name):
    return TORCH_G[name](F.linear(x, W, b))


def make(lead, n_in=4, n_out=3, bias=True, dtype=torch.float64):
    # Shift away from 0 so finite differences never straddle relu's kink.
    x = torch.randn(*lead, n_in, dtype=dtype)
    x = x + 0.1 * torch.sign(x)
    W = torch.randn(n_out, n_in, dtype=dtype)
    b = torch.randn(n_out, dtype=dtype) if bias else None
    return x, W, b


@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck(name, bias, lead):
    torch.manual_seed(0)
    inputs = [t for t in leaves(*make(lead, bias=bias)) if t is not None]

    def f(x, W, *b):
        return mb.linear_act(x, W, b[0] if b else None, name)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_matches_autograd(name, bias, lead, dtype):
    torch.manual_seed(1)
    x, W, b = make(lead, n_in=7, n_out=5, bias=bias, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    assert_same_as_autograd(
        lambda x, W, b: mb.linear_act(x, W, b, name),
        lambda x, W, b: reference(x, W, b, name),
        (x, W, b), **tol,
    )


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), max_size=3),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    name=st.sampled_from(NAMES),
    bias=st.booleans(),
)
def test_property_random_shapes(lead, n_in, n_out, name, bias):
    x, W, b = make(tuple(lead), n_in, n_out, bias)
    assert_same_as_autograd(
        lambda x, W, b: mb.linear_act(x, W, b, name),
        lambda x, W, b: reference(x, W, b, name),
        (x, W, b),
    )


def test_gradients_are_contiguous_in_each_parameters_dtype():
    x, W, b = leaves(*make((5,), n_in=6, n_out=4))
    out = mb.linear_act(x, W, b, "tanh")
    out.backward(noncontiguous_randn(out.shape))
    for t in (x, W, b):
        assert t.grad.is_contiguous() and t.grad.dtype == t.dtype and t.grad.shape == t.shape


def test_needs_input_grad_is_honoured():
    x, W, b = make((5,))
    W.requires_grad_()
    out = mb.linear_act(x, W, b, "relu")
    (grad_W,) = torch.autograd.grad(out, W, torch.ones_like(out))
    assert b.grad is None and x.grad is None
    # With only W wanted, backward must not compute delta W (the grad of x): count the matmuls.
    out = mb.linear_act(x, W, b, "relu")
    with torch.profiler.profile() as prof:
        out.backward(torch.ones_like(out))
    matmuls = [e for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::matmul")]
    assert len([e for e in matmuls if e.name == "aten::mm"]) == 1


def test_empty_batch_forward_and_backward():
    x, W, b = leaves(torch.randn(0, 4), torch.randn(3, 4), torch.randn(3))
    out = mb.linear_act(x, W, b, "gelu")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 4)
    assert torch.equal(W.grad, torch.zeros(3, 4)) and torch.equal(b.grad, torch.zeros(3))


def test_per_sample_gradients_with_vmap_and_grad():
    torch.manual_seed(2)
    x, W, b = make((6,), n_in=4, n_out=3)
    y = torch.randn(6, 3, dtype=torch.float64)

    def loss(W, b, x, y):
        return ((mb.linear_act(x, W, b, "silu") - y) ** 2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    gW, gb = per_sample(W, b, x, y)
    for i in range(6):
        Wi, bi = leaves(W, b)
        ((TORCH_G["silu"](F.linear(x[i], Wi, bi)) - y[i]) ** 2).sum().backward()
        torch.testing.assert_close(gW[i], Wi.grad)
        torch.testing.assert_close(gb[i], bi.grad)


def test_jacrev_matches_autograd_jacobian():
    x, W, b = make((2,))
    jac = torch.func.jacrev(lambda W: mb.linear_act(x, W, b, "tanh"))(W)
    ref = torch.autograd.functional.jacobian(lambda W: reference(x, W, b, "tanh"), W)
    torch.testing.assert_close(jac, ref)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_without_graph_breaks(backend):
    torch._dynamo.reset()
    x, W, b = leaves(*make((2, 3), dtype=torch.float32))
    f = torch.compile(lambda x, W, b: mb.linear_act(x, W, b, "gelu"), fullgraph=True,
                      backend=backend)
    out = f(x, W, b)
    g = noncontiguous_randn(out.shape, torch.float32)
    grads = torch.autograd.grad(out, (x, W, b), g)
    x2, W2, b2 = leaves(x, W, b)
    ref = reference(x2, W2, b2, "gelu")
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (x2, W2, b2), g), strict=True):
        torch.testing.assert_close(got, want)


def test_autocast_bf16_on_cpu_matches_nn_linear_under_autocast():
    torch.manual_seed(3)
    x, W, b = make((8,), n_in=16, n_out=8, dtype=torch.float32)
    mine, ref = leaves(x, W, b), leaves(x, W, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_m = mb.linear_act(*mine, "relu")
        out_r = F.relu(F.linear(*ref))
    assert out_m.dtype == out_r.dtype == torch.bfloat16
    torch.testing.assert_close(out_m, out_r)
    g = noncontiguous_randn(out_m.shape, torch.bfloat16)
    out_m.backward(g)
    out_r.backward(g)
    for m, r in zip(mine, ref, strict=True):
        assert m.grad.dtype == torch.float32  # back in the parameter's dtype
        torch.testing.assert_close(m.grad, r.grad)


def test_checkpoint_non_reentrant():
    from torch.utils.checkpoint import checkpoint

    x, W, b = leaves(*make((4,)))
    x2, W2, b2 = leaves(x, W, b)
    out = checkpoint(mb.linear_act, x, W, b, "softplus", use_reentrant=False)
    ref = mb.linear_act(x2, W2, b2, "softplus")
    g = noncontiguous_randn(out.shape)
    out.backward(g)
    ref.backward(g)
    for m, r in ((x, x2), (W, W2), (b, b2)):
        torch.testing.assert_close(m.grad, r.grad)


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_graph_is_freed_after_backward_without_gc(name):
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(4, 5, requires_grad=True)
        W = torch.randn(3, 5, requires_grad=True)
        ref = weakref.ref(x)
        out = mb.linear_act(x, W, None, name)
        out.sum().backward()
        del x, out
        assert ref() is None  # a tensor kept on ctx would form a cycle and survive
    finally:
        gc.enable()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_autograd(name, dtype):
    torch.manual_seed(4)
    x, W, b = (t.to("cuda", dtype) for t in make((2, 3), n_in=16, n_out=8, dtype=torch.float64))
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-9}
    assert_same_as_autograd(
        lambda x, W, b: mb.linear_act(x, W, b, name),
        lambda x, W, b: reference(x, W, b, name),
        (x, W, b), rtol=tol[dtype], atol=tol[dtype],
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    x, W, b = (t.to("cuda") for t in leaves(*make((8,), n_in=16, n_out=8, dtype=torch.float32)))
    x, W, b = leaves(x, W, b)
    with torch.autocast("cuda", dtype=dtype):
        out = mb.linear_act(x, W, b, "gelu")
    assert out.dtype == dtype
    out.float().sum().backward()
    assert W.grad.dtype == torch.float32 and torch.isfinite(W.grad).all()


def test_saves_only_what_backward_needs():
    # x needs no gradient: W serves only grad_x, so it must not be saved (under autocast it
    # would be a real bf16 copy); a frozen W likewise frees the input.
    saved = []
    x, W, b = make((4,), dtype=torch.float32)
    W.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mb.linear_act(x, W, b, "relu")
    assert not any(t is W or t.data_ptr() == W.data_ptr() for t in saved)
    saved.clear()
    x.requires_grad_()
    W.requires_grad_(False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mb.linear_act(x, W, b, "relu")
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
