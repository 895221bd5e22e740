"""MLP's three ways through the slides' pass agree with autograd and with each other.

eager:    MLPEagerFunction (plain eager float32/float64: what MLP uses by default)
general:  MLPFunction (torch.func, torch.compile, autocast, half dtypes, a Trace)
backprop: MLP.backprop, no autograd at all
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from test_activations import TORCH_G
from test_mlp import autograd_twin
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb

NAMES = sorted(TORCH_G)


def run(mlp, x, path):
    """Logits through the chosen Function (a Trace sends MLP down the general path)."""
    return mlp(x, trace=mb.Trace()) if path == "general" else mlp(x)


@pytest.mark.parametrize("path", ["eager", "general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_logits_match_autograd_through_both_functions(name, lead, dtype, path):
    torch.manual_seed(20)
    mlp = mb.MLP([5, 7, 6, 4], activation=name, dtype=dtype)
    twin = autograd_twin(mlp)
    x = torch.randn(*lead, 5, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = torch.randint(0, 4, lead)
    if path == "general":
        logits = run(mlp, x, path)
        loss = mb.softmax_cross_entropy(logits.reshape(-1, 4), y.reshape(-1))
    else:
        loss, logits = mlp.loss(x, y)
    ref_logits = twin(x2)
    ref = F.cross_entropy(ref_logits.reshape(-1, 4), y.reshape(-1))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(logits, ref_logits, **tol)
    g = noncontiguous_randn(logits.shape, dtype)  # gradient through loss and logits at once
    (-1.5 * loss + (logits * g).sum()).backward()
    (-1.5 * ref + (ref_logits * g).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol)
        assert p.grad.is_contiguous()


@pytest.mark.parametrize("name", NAMES)
def test_eager_function_gradcheck_and_gradgradcheck(name):
    # Second derivatives through the eager Function come from recomputing a[i] and z[i] in
    # backward; a saved intermediate would silently drop terms here.
    torch.manual_seed(21)
    mlp = mb.MLP([3, 4, 3], activation=name, dtype=torch.float64)
    x = (torch.rand(5, 3, dtype=torch.float64) + 0.2).requires_grad_()  # off relu's kink
    y = torch.tensor([0, 2, 1, 2, 0])
    params = list(mlp.parameters())
    acts = tuple(layer.activation for layer in mlp.layers)
    flat = [p for pair in zip(params[0::2], params[1::2], strict=True) for p in pair]

    def f(x, *ps):
        return mb.MLPEagerFunction.apply(x, y, acts, *ps)

    def g(x, *ps):
        return mb.MLPEagerFunction.apply(x, None, acts, *ps)

    assert gradcheck(f, (x, *flat)) and gradgradcheck(f, (x, *flat))
    assert gradcheck(g, (x, *flat)) and gradgradcheck(g, (x, *flat))


def test_ignored_targets_follow_cross_entropy():
    torch.manual_seed(22)
    mlp = mb.MLP([4, 6, 3], activation="tanh", dtype=torch.float64)
    twin = autograd_twin(mlp)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, -100, 2, 1, -100, 2])
    loss, _ = mlp.loss(x, y)
    ref = F.cross_entropy(twin(x), y)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    general = mb.MLP([4, 6, 3], activation="tanh", dtype=torch.float64)
    general.load_state_dict(mlp.state_dict())
    out = mb.MLPFunction.apply(x, y, ("tanh", "identity"), None, *general.parameters())
    out[-1].backward()
    for p, q in zip(general.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_eager_path_saves_no_more_new_memory_than_autograd():
    torch.manual_seed(23)
    mlp = mb.MLP([16, 32, 32, 4], activation="gelu")
    twin = autograd_twin(mlp)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def new_bytes(fn, model):
        known = {p.data_ptr() for p in model.parameters()} | {x.data_ptr()}
        seen = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: seen.setdefault(t.data_ptr(), t) is t or t, lambda t: t):
            fn()
        return sum(t.untyped_storage().nbytes() for ptr, t in seen.items() if ptr not in known)

    mine = new_bytes(lambda: mlp.loss(x, y), mlp)
    ref = new_bytes(lambda: F.cross_entropy(twin(x), y), twin)
    assert 0 < mine <= ref


def test_eager_path_leaks_nothing():
    mlp = mb.MLP([4, 6, 2], activation="relu")
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(3, 4, requires_grad=True)
        ref = weakref.ref(x)
        loss, logits = mlp.loss(x, torch.tensor([0, 1, 1]))
        (loss + logits.sum()).backward()
        del x, loss, logits
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_backprop_gives_the_gradients_of_loss_backward(name, bias, lead, dtype):
    torch.manual_seed(24)
    mlp = mb.MLP([5, 7, 6, 4], activation=name, bias=bias, dtype=dtype)
    twin = autograd_twin(mlp)
    x, y = torch.randn(*lead, 5, dtype=dtype), torch.randint(0, 4, lead)
    loss = mlp.backprop(x, y)
    ref = F.cross_entropy(twin(x).reshape(-1, 4), y.reshape(-1))
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), **tol)
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol)
        assert p.grad.is_contiguous() and p.grad.dtype == p.dtype


def test_backprop_accumulates_skips_frozen_and_leaves_x_alone():
    torch.manual_seed(25)
    mlp = mb.MLP([4, 5, 3], dtype=torch.float64)
    mlp.layers[0].weight.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    mlp.backprop(x, y)
    once = [None if p.grad is None else p.grad.clone() for p in mlp.parameters()]
    mlp.backprop(x, y)
    assert mlp.layers[0].weight.grad is None and x.grad is None
    for p, g in zip(mlp.parameters(), once, strict=True):
        if g is not None:
            torch.testing.assert_close(p.grad, 2 * g)
    mlp.backprop(x, y, accumulate=False)
    for p, g in zip(mlp.parameters(), once, strict=True):
        if g is not None:
            torch.testing.assert_close(p.grad, g)


def test_backprop_with_adam_trains_like_autograd():
    torch.manual_seed(26)
    mlp = mb.MLP([8, 16, 3], dtype=torch.float64)
    twin = autograd_twin(mlp)
    opt_m = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    opt_r = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    for _ in range(20):
        opt_m.zero_grad()
        mlp.backprop(x, y)
        opt_m.step()
        opt_r.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        opt_r.step()
    for p, q in zip(mlp.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_backprop_under_autocast_matches_loss_backward():
    torch.manual_seed(27)
    mlp = mb.MLP([16, 32, 4], activation="tanh")
    ref = mb.MLP([16, 32, 4], activation="tanh")
    ref.load_state_dict(mlp.state_dict())
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mlp.backprop(x, y)
        ref_loss = ref.loss(x, y)[0]
    ref_loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss.detach())
    for p, q in zip(mlp.parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("target,error,pattern", [
    (torch.tensor([0, 1, 3]), ValueError, r"MLP.backprop: class index 3 at target\[2\].*C=3"),
    (torch.tensor([0, 1]), ValueError, r"MLP.backprop: expected target of shape \(3,\)"),
    (torch.rand(3), TypeError, "MLP.backprop: expected integer class indices"),
    (torch.tensor([0, 1, 2], dtype=torch.int16), TypeError,
     "MLP.backprop: expected class indices of dtype torch.int64 .*got torch.int16"),
])
def test_backprop_bad_targets(target, error, pattern):
    mlp = mb.MLP([2, 3])
    with pytest.raises(error, match=pattern):
        mlp.backprop(torch.randn(3, 2), target)
    assert all(p.grad is None for p in mlp.parameters())  # nothing half-written
