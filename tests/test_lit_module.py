"""LitMLP: sizes from the data, heads, the autograd twin, and manual/autograd parity."""

from functools import partial

import pytest
import torch
from torch import nn

import manualbp as mb
from manualbp.lit import LitMLP
from manualbp.lit.heads import head_loss, head_preds, head_probs, resolve_head
from manualbp.lit.module import initialise
from manualbp.lit.twin import twin_forward


def _model(backend="manual", num_features=5, num_classes=3, task="multiclass", **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("hidden_sizes", [7, 6])
    kwargs.setdefault("activation", "tanh")
    return LitMLP(partial(mb.MLP), partial(torch.optim.SGD, lr=0.5), num_features, num_classes,
                  task, backend=backend, **kwargs)


def _batches(n=4, num_features=5, num_classes=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, num_features, generator=g, dtype=dtype),
             torch.randint(0, num_classes, (16,), generator=g)) for _ in range(n)]


def test_sizes_come_from_the_data():
    model = _model(num_features=5, num_classes=3)
    assert model.net.sizes == [5, 7, 6, 3]
    assert model.activations == ["tanh", "tanh", "identity"]


def test_explicit_sizes_that_disagree_with_the_data_name_both_counts():
    expected = r"model.sizes: .*\[5, \.\.\., 3\].*3 classes.*got \[5, 8, 4\]"
    with pytest.raises(ValueError, match=expected):
        _model(sizes=[5, 8, 4])
    assert _model(sizes=[5, 8, 3]).net.sizes == [5, 8, 3]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="model.backend: expected one of .*got 'numpy'"):
        _model(backend="numpy")


@pytest.mark.parametrize(("task", "classes", "head"), [
    ("multiclass", 3, "softmax"), ("binary", 2, "logistic"), ("regression", 2, "identity")])
def test_auto_head_follows_the_task(task, classes, head):
    assert resolve_head("auto", task, classes) == head


def test_a_head_that_does_not_fit_the_task_is_refused():
    with pytest.raises(ValueError, match="logistic needs exactly 2 classes, got 3"):
        resolve_head("logistic", "multiclass", 3)
    with pytest.raises(ValueError, match="head 'identity' does not fit task 'multiclass'"):
        resolve_head("identity", "multiclass", 3)


def test_binary_data_get_one_logistic_output_and_two_probabilities():
    model = _model(num_classes=2, task="binary")
    assert model.net.sizes[-1] == 1
    x, _ = _batches(1, num_classes=2)[0]
    probs = model.predict_step((x, None), 0)
    assert probs.shape == (16, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))


def test_predict_step_returns_class_probabilities():
    model = _model()
    probs = model.predict_step(_batches(1)[0], 0)
    assert probs.shape == (16, 3) and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))


def test_predictions_are_the_most_probable_class():
    logistic = torch.tensor([[2.0], [-3.0], [0.5]])
    assert head_preds("logistic", logistic).tolist() == [1, 0, 1]
    assert head_probs("logistic", logistic).argmax(-1).tolist() == [1, 0, 1]
    softmax = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert head_preds("softmax", softmax).tolist() == [1, 0]


@pytest.mark.parametrize("head", ["softmax", "logistic", "identity"])
def test_manual_and_torch_losses_agree(head):
    g = torch.Generator().manual_seed(2)
    width = 1 if head == "logistic" else 3
    logits = torch.randn(8, width, generator=g, dtype=torch.float64)
    y = (torch.randn(8, 3, generator=g, dtype=torch.float64) if head == "identity"
         else torch.randint(0, 2 if head == "logistic" else 3, (8,), generator=g))
    torch.testing.assert_close(head_loss(head, logits, y, manual=True),
                               head_loss(head, logits, y, manual=False))
    assert head_probs(head, logits).shape[0] == 8


def test_twin_starts_from_the_same_weights_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    manual = _model("manual")
    after_manual = torch.rand(1)
    autograd = _model("autograd")
    after_autograd = torch.rand(1)
    assert torch.equal(after_manual, after_autograd)  # same data shuffling afterwards
    assert isinstance(autograd.net, nn.Sequential)
    for a, b in zip(manual.linear_layers(), autograd.linear_layers(), strict=True):
        assert type(b) is nn.Linear
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_twin_hooks_record_the_same_a_and_delta_as_the_manual_trace():
    x, y = _batches(1, dtype=torch.float64)[0]
    traces = {}
    for backend in ("manual", "autograd"):
        model = _model(backend).double()
        trace = mb.Trace()
        loss, _, _ = model.model_step((x, y), trace)
        loss.backward()
        traces[backend] = trace
    for name in ("a", "delta"):
        got, want = getattr(traces["autograd"], name), getattr(traces["manual"], name)
        assert len(got) == len(want) == 3
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_twin_forward_without_trace_is_the_plain_sequential():
    model = _model("autograd")
    x, _ = _batches(1)[0]
    assert torch.equal(twin_forward(model.net, x), model.net(x))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_manual_and_autograd_backends_give_the_same_losses_step_by_step(dtype, tol):
    losses = {}
    for backend in ("manual", "autograd"):
        model = _model(backend).to(dtype)
        optimizer = model.configure_optimizers()
        losses[backend] = []
        for batch in _batches(1, dtype=dtype) * 6:  # one batch again and again: loss falls
            loss, _, _ = model.model_step(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[backend].append(loss.item())
    assert losses["manual"][-1] < losses["manual"][0]  # it trains
    for got, want in zip(losses["autograd"], losses["manual"], strict=True):
        assert abs(got - want) <= tol * max(1.0, abs(want))


@pytest.mark.parametrize(("init", "std"), [("he", (2 / 400) ** 0.5), ("xavier", (2 / 800) ** 0.5)])
def test_initialise_draws_the_promised_spread(init, std):
    torch.manual_seed(0)
    layers = mb.MLP([400, 400], activation="relu").layers
    initialise(layers, init)
    assert layers[0].weight.std().item() == pytest.approx(std, rel=0.02)
    assert torch.equal(layers[0].bias, torch.zeros(400))
    with pytest.raises(ValueError, match="model.init: expected one of .*got 'glorot'"):
        initialise(layers, "glorot")
