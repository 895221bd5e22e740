import pytest
import torch
import torch.nn.functional as F
from oracle import assert_same_as_autograd, leaves
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb

REDUCTIONS = ["mean", "sum", "none"]
N, C = 6, 4


def logits(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


INDEX_CASES = {
    "plain": dict(),
    "weight": dict(weight=torch.rand(C, dtype=torch.float64) + 0.1),
    "smoothing": dict(label_smoothing=0.2),
    "weight+smoothing": dict(weight=torch.rand(C, dtype=torch.float64) + 0.1,
                             label_smoothing=0.3),
    "ignore": dict(ignore_index=2),
    "all": dict(weight=torch.rand(C, dtype=torch.float64) + 0.1, ignore_index=1,
                label_smoothing=0.1),
}


def index_target(kwargs):
    y = torch.tensor([0, 3, 2, 1, 3, 1])
    if "ignore_index" not in kwargs:
        y[2] = -100  # torch's default ignore_index
    return y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_cross_entropy_class_indices_match_torch(case, reduction):
    torch.manual_seed(0)
    kw = INDEX_CASES[case]
    y = index_target(kw)
    for dtype in (torch.float64, torch.float32):
        tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        kw_d = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        assert_same_as_autograd(
            lambda z, kw_d=kw_d: mb.softmax_cross_entropy(z, y, reduction=reduction, **kw_d),
            lambda z, kw_d=kw_d: F.cross_entropy(z, y, reduction=reduction, **kw_d),
            (logits(N, C, dtype=dtype),), **tol,
        )
    z = leaves(logits(N, C))
    f = lambda z: mb.softmax_cross_entropy(z, y, reduction=reduction, **kw)  # noqa: E731
    assert gradcheck(f, z) and gradgradcheck(f, z)


PROB_CASES = {
    "plain": dict(),
    "weight": dict(weight=torch.rand(C, dtype=torch.float64) + 0.1),
    "weight+smoothing": dict(weight=torch.rand(C, dtype=torch.float64) + 0.1,
                             label_smoothing=0.25),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(PROB_CASES))
def test_cross_entropy_class_probabilities_match_torch(case, reduction):
    torch.manual_seed(1)
    kw = PROB_CASES[case]
    p = torch.softmax(logits(N, C), 1)
    # the target is differentiable too, as in torch
    assert_same_as_autograd(
        lambda z, p: mb.softmax_cross_entropy(z, p, reduction=reduction, **kw),
        lambda z, p: F.cross_entropy(z, p, reduction=reduction, **kw),
        (logits(N, C), p),
    )
    z, p = leaves(logits(N, C), p)
    f = lambda z, p: mb.softmax_cross_entropy(z, p, reduction=reduction, **kw)  # noqa: E731
    assert gradcheck(f, (z, p)) and gradgradcheck(f, (z, p))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_spatial_and_unbatched(reduction):
    torch.manual_seed(2)
    y = torch.randint(0, 3, (2, 4, 5))
    assert_same_as_autograd(
        lambda z: mb.softmax_cross_entropy(z, y, reduction=reduction),
        lambda z: F.cross_entropy(z, y, reduction=reduction),
        (logits(2, 3, 4, 5),),
    )
    p = torch.softmax(logits(2, 3, 4), 1)
    assert_same_as_autograd(
        lambda z: mb.softmax_cross_entropy(z, p, reduction=reduction),
        lambda z: F.cross_entropy(z, p, reduction=reduction),
        (logits(2, 3, 4),),
    )
    y1 = torch.tensor(2)
    assert_same_as_autograd(
        lambda z: mb.softmax_cross_entropy(z, y1, reduction=reduction),
        lambda z: F.cross_entropy(z, y1, reduction=reduction),
        (logits(C),),
    )


def test_delta_L_is_yhat_minus_y_over_m():
    z, = leaves(logits(N, C))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    mb.softmax_cross_entropy(z, y).backward()
    expected = (torch.softmax(z, 1) - F.one_hot(y, C)) / N
    torch.testing.assert_close(z.grad, expected.detach())


def test_cross_entropy_is_stable_for_huge_logits():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    y = torch.tensor([1, 1])
    loss = mb.softmax_cross_entropy(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    torch.testing.assert_close(loss, F.cross_entropy(z.detach(), y))
    zb = torch.tensor([[1e4], [-1e4]], requires_grad=True)
    t = torch.tensor([[0.0], [1.0]])
    loss = mb.sigmoid_binary_cross_entropy(zb, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zb.grad).all()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(zb.detach(), t))


BCE_CASES = {
    "plain": dict(),
    "weight": dict(weight=torch.rand(3, dtype=torch.float64)),
    "pos_weight": dict(pos_weight=torch.rand(3, dtype=torch.float64) * 3),
    "both": dict(weight=torch.rand(5, 1, dtype=torch.float64),
                 pos_weight=torch.rand(3, dtype=torch.float64) * 3),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(BCE_CASES))
def test_bce_with_logits_matches_torch(case, reduction):
    torch.manual_seed(3)
    kw = BCE_CASES[case]
    y = torch.rand(5, 3, dtype=torch.float64)
    assert_same_as_autograd(
        lambda z, y: mb.sigmoid_binary_cross_entropy(z, y, reduction=reduction, **kw),
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction=reduction, **kw),
        (logits(5, 3), y),
    )
    z, y = leaves(logits(5, 3), y)
    f = lambda z, y: mb.sigmoid_binary_cross_entropy(z, y, reduction=reduction, **kw)  # noqa
    assert gradcheck(f, (z, y)) and gradgradcheck(f, (z, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_matches_torch(reduction):
    torch.manual_seed(4)
    assert_same_as_autograd(
        lambda a, y: mb.mse_loss(a, y, reduction),
        lambda a, y: F.mse_loss(a, y, reduction=reduction),
        (logits(5, 2), logits(5, 2)),
    )
    a, y = leaves(logits(3, 2), logits(3, 2))
    f = lambda a, y: mb.mse_loss(a, y, reduction)  # noqa: E731
    assert gradcheck(f, (a, y)) and gradgradcheck(f, (a, y))


def test_module_forms_take_torch_arguments_and_match():
    torch.manual_seed(5)
    w, pos_weight = torch.rand(C), torch.rand(C) * 3
    pairs = [
        (mb.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum"),
         nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum"),
         torch.tensor([0, 1, 2, 3, 0, 1])),
        (mb.BCEWithLogitsLoss(pos_weight=pos_weight), nn.BCEWithLogitsLoss(pos_weight=pos_weight),
         None),
        (mb.MSELoss(reduction="none"), nn.MSELoss(reduction="none"), torch.randn(N, C)),
    ]
    for mine, ref, y in pairs:
        y = torch.rand(N, C) if y is None else y
        assert mine.state_dict().keys() == ref.state_dict().keys()
        z = torch.randn(N, C, requires_grad=True)
        z2 = z.detach().clone().requires_grad_()
        a, b = mine(z, y), ref(z2, y)
        torch.testing.assert_close(a, b)
        g = torch.randn_like(a)
        a.backward(g)
        b.backward(g)
        torch.testing.assert_close(z.grad, z2.grad)
    assert isinstance(mb.CrossEntropyLoss(), nn.CrossEntropyLoss)


def test_autocast_runs_the_loss_in_float32():
    z = torch.randn(N, C, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mb.softmax_cross_entropy(z.to(torch.bfloat16), y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.float32


@pytest.mark.parametrize("target,pattern", [
    (torch.tensor([0, 1, 4, 0, 1, 2]), r"class index 4 at target\[2\].*out of range for C=4"),
    (torch.tensor([0, 1, 2, -1, 1, 2]), r"class index -1 at target\[3\].*negative"),
    (torch.tensor([0, 1, 2]), r"expected class-index target of shape \(6,\).*got \(3,\)"),
    (torch.rand(6, 3), r"expected probability target of the input's shape \(6, 4\), got \(6, 3\)"),
])
def test_cross_entropy_bad_targets_are_named(target, pattern):
    with pytest.raises(ValueError, match=pattern):
        mb.softmax_cross_entropy(torch.randn(N, C), target)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: mb.softmax_cross_entropy(torch.randn(N, C), torch.zeros(N).long(), reduction="avg"),
     ValueError, "expected reduction 'mean', 'sum' or 'none', got 'avg'"),
    (lambda: mb.softmax_cross_entropy(torch.zeros(N, C).long(), torch.zeros(N).long()),
     TypeError, "expected floating-point input"),
    (lambda: mb.softmax_cross_entropy(torch.randn(N, C), torch.zeros(N).long(),
                                      weight=torch.ones(3)),
     ValueError, r"expected weight of shape \(C,\)=\(4,\), got \(3,\)"),
    (lambda: mb.sigmoid_binary_cross_entropy(torch.randn(4, 1), torch.rand(4)),
     ValueError, r"expected target of the input's shape \(4, 1\), got \(4,\)"),
    (lambda: mb.sigmoid_binary_cross_entropy(torch.randn(4), torch.ones(4).long()),
     TypeError, "expected floating-point targets"),
    (lambda: mb.mse_loss(torch.randn(4, 1), torch.randn(4)),
     ValueError, r"expected target of the input's shape \(4, 1\), got \(4,\)"),
])
def test_loss_errors_are_clear(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
