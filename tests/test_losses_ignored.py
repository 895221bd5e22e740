"""Losses on batches where nothing (or everything) counts: torch's values and gradients, never NaN
where torch's gradient is 0 (padding-only batches in sequence models), plus odd target dtypes."""

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from torch.testing import assert_close

import manualbp as mb

D = torch.float64


def _grads(loss_fn, z, target, kw, g):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z, target, **kw)
    loss.backward(g)
    return loss.detach(), z.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)])
@pytest.mark.parametrize("ignored", ["all", "some"])
def test_ignored_targets_match_torch(reduction, weight, label_smoothing, shape, ignored):
    torch.manual_seed(0)
    z = torch.randn(*shape, dtype=D)
    tshape = shape[:1] + shape[2:]
    target = torch.randint(0, shape[1], tshape)
    target[...] = -100 if ignored == "all" else target
    if ignored == "some":
        target.view(-1)[::2] = -100
    kw = dict(weight=torch.rand(shape[1], dtype=D) + 0.1 if weight else None,
              reduction=reduction, label_smoothing=label_smoothing)
    out_shape = tshape if reduction == "none" else ()
    g = noncontiguous_randn(out_shape) if out_shape else torch.randn((), dtype=D)
    loss_r, grad_r = _grads(F.cross_entropy, z, target, kw, g)
    module = mb.CrossEntropyLoss(**kw)
    for fn in (mb.softmax_cross_entropy, lambda z, t, **_: module(z, t)):
        loss_m, grad_m = _grads(fn, z, target, kw, g)
        assert_close(loss_m, loss_r, equal_nan=True)  # a mean over nothing is NaN, as torch's
        assert torch.isfinite(grad_m).all()
        assert_close(grad_m, grad_r)
        if ignored == "all":
            assert (grad_m == 0).all()


def test_one_sgd_step_on_a_padding_only_batch_leaves_the_model_finite():
    torch.manual_seed(0)
    model = torch.nn.Sequential(mb.Linear(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = mb.CrossEntropyLoss(weight=torch.rand(4), label_smoothing=0.1)(
        model(torch.randn(3, 6)), torch.full((3,), -100))
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_zero_total_weight_is_non_finite_where_torch_is(label_smoothing):
    """Not ignored, but every present class weighs 0: torch's own mean is 0/0, so is ours."""
    z = torch.randn(4, 5, dtype=D)
    target = torch.tensor([1, 1, 2, 2])
    kw = dict(weight=torch.tensor([1.0, 0, 0, 1, 1], dtype=D), label_smoothing=label_smoothing)
    g = torch.tensor(0.7, dtype=D)
    _, grad_r = _grads(F.cross_entropy, z, target, kw, g)
    _, grad_m = _grads(mb.softmax_cross_entropy, z, target, kw, g)
    assert not torch.isfinite(grad_r).all() and not torch.isfinite(grad_m).all()


def test_byte_targets_are_class_indices_as_in_torch():
    """uint8 targets index classes in torch; indexing with them here would be a boolean mask."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=D)
    target = torch.tensor([0, 3, 2], dtype=torch.uint8)
    for ls in (0.0, 0.1):
        g = torch.tensor(-1.3, dtype=D)
        loss_r, grad_r = _grads(F.cross_entropy, z, target.long(), dict(label_smoothing=ls), g)
        loss_m, grad_m = _grads(mb.softmax_cross_entropy, z, target,
                                dict(label_smoothing=ls, weight=torch.ones(4, dtype=D)), g)
        assert_close(loss_m, loss_r)
        assert_close(grad_m, grad_r)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: mb.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2],
                                      dtype=torch.int32)),
     TypeError, r"expected class indices of dtype torch.int64 \(or torch.uint8\), got "
                r"torch.int32; pass target.long\(\)"),
    (lambda: mb.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 1]).bool()),
     TypeError, r"got torch.bool; pass target.long\(\)"),
    (lambda: mb.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                      weight=torch.ones(4, dtype=torch.long)),
     TypeError, r"expected weight of the input's dtype torch.float32, got torch.int64"),
    (lambda: mb.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                      weight=torch.ones(4, dtype=D)),
     TypeError, r"expected weight of the input's dtype torch.float32, got torch.float64; "
                r"pass weight.to\(torch.float32\)"),
    (lambda: mb.softmax_cross_entropy(torch.randn(3, 4, dtype=torch.cfloat), torch.tensor([0])),
     TypeError, r"softmax_cross_entropy: expected floating-point input \(logits\), got dtype "
                r"torch.complex64; the hand-written derivatives are real-valued"),
    (lambda: mb.mse_loss(torch.randn(3, 2).to_sparse(), torch.randn(3, 2)),
     TypeError, r"mse_loss: expected a dense \(strided\) input, got a sparse_coo tensor; "
                r"pass input.to_dense\(\)"),
    (lambda: mb.sigmoid_binary_cross_entropy(torch.randn(3, 2), torch.rand(3, 2).to_sparse()),
     TypeError, r"expected a dense \(strided\) target, got a sparse_coo tensor"),
])
def test_loss_dtype_and_layout_errors_are_clear(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kw", [
    {}, {"reduction": "none"}, {"reduction": "sum"}, {"label_smoothing": 0.1},
    {"weight": torch.rand(4, dtype=D) + 0.5}, {"ignore_index": 2},
])
@pytest.mark.parametrize("native", [False, True])
def test_a_bad_class_index_is_named_after_the_kernel_refuses_it(kw, native, monkeypatch):
    """The loss kernel refuses a bad index (no scan of good targets); the message names it,
    raised plainly (no kernel traceback chained), on every option of the class-index path."""
    from manualbp import losses
    if native:
        if mb.native.lib() is None:
            pytest.skip("the C++ core is not available here")
    else:
        monkeypatch.setattr(losses, "_native", lambda z: None)
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    target = torch.tensor([[0, 1, 2], [3, 7, -100]])
    with pytest.raises(ValueError, match=r"class index 7 at target\[4\] \(flattened\).*C=4") as e:
        mb.softmax_cross_entropy(z, target, **kw)
    assert e.value.__cause__ is None and e.value.__context__ is None
    with pytest.raises(ValueError, match="class index 7"):
        mb.CrossEntropyLoss(**kw)(z, target)
    calls = []  # good input: the batch is never scanned for the message
    monkeypatch.setattr(losses, "explain_class_indices", lambda *a: calls.append(a))
    zg = z.clone().requires_grad_()
    mb.softmax_cross_entropy(zg, target.clamp(0, 3), **kw).sum().backward()
    assert calls == [] and torch.isfinite(zg.grad).all()
