"""The lean per-call Python around the passes: every change to a module shows on the next call,
and the short checks of the usual call leave no bad input through unexplained.

MLP._flat, Linear.forward and MLP.zero_grad read the layers' parameter dicts directly (no
nn.Module.__getattr__) and cache nothing; check_linear_args and check_cross_entropy answer the
usual call in a few reads and leave one check (the target's length) to the loss kernel. Each
change below is made after a first call, so that anything kept from that call would show.
Runs on whichever backend is active (the suite runs once native, once with MANUALBP_NATIVE=0).
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import manualbp as mb
from manualbp import losses

D = torch.float64


class Doubled(nn.Module):
    def forward(self, W):
        return 2 * W


def _replace_weight(layers):
    layers[1].weight = nn.Parameter(torch.randn_like(layers[1].weight))


def _drop_bias(layers):
    layers[0].bias = None


def _freeze(layers):
    layers[0].weight.requires_grad_(False)


def _parametrize(layers):
    parametrize.register_parametrization(layers[1], "weight", Doubled())


def _assign_data(layers):  # the same Parameter object, new values
    layers[1].weight.data = torch.randn_like(layers[1].weight)


CHANGES = [_replace_weight, _drop_bias, _freeze, _parametrize, _assign_data]


def _reference(layers, x, y):
    """Autograd on F.linear + relu from the layers' parameters as they are now."""
    a = x
    for i, layer in enumerate(layers):
        a = F.linear(a, layer.weight, layer.bias)
        a = torch.relu(a) if i < len(layers) - 1 else a
    return F.cross_entropy(a, y)


def _leaves(model):
    return [p for p in model.parameters() if p.requires_grad]


def _check_against_reference(model, layers, run, x, y):
    model.zero_grad()
    loss = run()
    loss.backward()
    got = [p.grad for p in _leaves(model)]
    model.zero_grad()
    ref = _reference(layers, x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(got, _leaves(model), strict=True):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("path", ["natural", "loss", "per_layer"])
def test_a_change_after_a_call_shows_on_the_next_call(change, path):
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    if path == "per_layer":
        model = mb.convert(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))).to(D)
        layers = [m for m in model.modules() if isinstance(m, mb.Linear)]
        run = lambda: mb.softmax_cross_entropy(model(x), y)  # noqa: E731
    else:
        model = mb.MLP([4, 5, 3], dtype=D)
        layers = list(model.layers)
        run = ((lambda: mb.softmax_cross_entropy(model(x), y)) if path == "natural"
               else (lambda: model.loss(x, y)[0]))
    _check_against_reference(model, layers, run, x, y)  # a first call, warm
    change(layers)
    _check_against_reference(model, layers, run, x, y)


def test_a_dtype_change_after_a_call_shows_on_the_next_call():
    mlp = mb.MLP([4, 5, 3])
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    assert mlp(x).dtype == torch.float32
    mlp.to(D)
    assert mlp(x.to(D)).dtype == D
    _check_against_reference(mlp, list(mlp.layers), lambda: mlp.loss(x.to(D), y)[0], x.to(D), y)
    with pytest.raises(TypeError, match=r"MLP: expected input dtype to match the weight's "
                                        r"torch.float64, got torch.float32"):
        mlp(x)


def test_functional_call_sees_the_tensors_it_is_given():
    mlp, lin = mb.MLP([4, 5, 3], dtype=D), mb.Linear(4, 5, activation="relu", dtype=D)
    x = torch.randn(6, 4, dtype=D)
    mlp(x), lin(x)  # warm
    for module in (mlp, lin):
        new = {k: torch.randn_like(v) for k, v in module.named_parameters()}
        got = torch.func.functional_call(module, new, (x,))
        W0, b0 = new.get("layers.0.weight", new.get("weight")), new.get("layers.0.bias",
                                                                         new.get("bias"))
        a = torch.relu(F.linear(x, W0, b0))
        if module is mlp:
            a = F.linear(a, new["layers.1.weight"], new["layers.1.bias"])
        torch.testing.assert_close(got, a)


def test_a_hook_added_after_a_call_is_refused():
    mlp = mb.MLP([5, 6, 3])
    x = torch.randn(2, 5)
    mlp(x)
    mlp.layers[1].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"MLP: layers\[1\] has forward hooks"):
        mlp(x)


def test_zero_grad_clears_every_parameter_of_a_subclass():
    class WithHead(mb.MLP):
        def __init__(self):
            super().__init__([4, 5, 3])
            self.head = nn.Linear(3, 2)

    model = WithHead()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bias_shape", [(1,), (1, 5), (5, 1), ()])
def test_a_bias_that_would_broadcast_is_refused(bias_shape):
    """F.linear broadcasts a bias of shape (1,) or (1, n_out): the checks must refuse it."""
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    b = torch.randn(bias_shape)
    match = re.escape(f"expected bias of shape (5,), got {tuple(bias_shape)}")
    with pytest.raises(ValueError, match=match):
        mb.linear_act(x, W, b, "relu")
    mlp = mb.MLP([4, 5, 3])
    mlp(x)
    mlp.layers[0].bias = nn.Parameter(b)
    for call in (lambda: mlp(x), lambda: mlp.loss(x, torch.tensor([0, 1, 2]))):
        with pytest.raises(ValueError, match=match.replace("expected", "MLP: expected")):
            call()


@pytest.mark.parametrize("bias_shape", [(1,), ()])
def test_a_later_layer_bias_that_would_broadcast(bias_shape):
    """Past layer 1, MLP.backprop refuses a broadcast bias (it writes .grad itself: an (n_out,)
    gradient would land on a (1,) parameter), while loss().backward() sums the gradient back
    to the bias's shape, as for nn.Linear."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    mlp = mb.MLP([4, 5, 3], dtype=D)
    mlp.layers[1].bias = nn.Parameter(torch.randn(bias_shape, dtype=D))
    with pytest.raises(ValueError, match=re.escape(
            f"MLP.backprop: expected layers[1].bias of shape (3,), got {tuple(bias_shape)}")):
        mlp.backprop(x, y)
    assert all(p.grad is None for p in mlp.parameters())
    mlp.loss(x, y)[0].backward()
    W0, b0, W1 = (t.detach() for t in (mlp.layers[0].weight, mlp.layers[0].bias,
                                        mlp.layers[1].weight))
    b = mlp.layers[1].bias.detach().clone().requires_grad_(True)
    F.cross_entropy(F.linear(F.relu(F.linear(x, W0, b0)), W1) + b, y).backward()
    assert mlp.layers[1].bias.grad.shape == b.shape
    torch.testing.assert_close(mlp.layers[1].bias.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(3, 4, dtype=D), TypeError, r"expected input dtype to match the weight's "
                                            r"torch.float32, got torch.float64"),
    (torch.randn(3, 5), ValueError, r"expected input with last dim in_features=4, got shape"),
    (torch.tensor(1.0), ValueError, r"got a 0-dim tensor"),
    (torch.ones(3, 4, dtype=torch.long), TypeError, r"expected a floating-point input"),
    (torch.randn(3, 4, dtype=torch.cfloat), TypeError, r"expected a floating-point input"),
    (torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)]), TypeError,
     r"got a nested tensor"),
    (torch.randn(2, 3, 4).to_sparse(), TypeError, r"sparse_coo input to be 2-D"),
])
def test_bad_input_meets_the_explaining_checks(x, error, match):
    mlp = mb.MLP([4, 5, 3])
    mlp(torch.randn(3, 4))  # warm
    with pytest.raises(error, match="^MLP: .*" + match):
        mlp(x)
    with pytest.raises(error, match="^linear_act: .*" + match):
        mb.linear_act(x, mlp.layers[0].weight, mlp.layers[0].bias, "relu")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"weight": torch.ones(3, dtype=D)}])
def test_a_target_of_the_wrong_length_is_named_after_the_kernel_refuses_it(native, kw,
                                                                          monkeypatch):
    if native and mb.native.lib() is None:
        pytest.skip("the C++ core is not available here")
    if not native:
        monkeypatch.setattr(losses, "_native", lambda z: None)
    z = torch.randn(4, 3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: expected class-index target "
                                         r"of shape \(4,\) for input \(4, 3\), got \(3,\)") as e:
        mb.softmax_cross_entropy(z, torch.tensor([0, 1, 2]), **kw)
    assert e.value.__cause__ is None and e.value.__context__ is None


def test_a_kernel_error_about_something_else_is_raised_as_it_came(monkeypatch):
    class Refusing:
        def softmax_cross_entropy(self, *args):
            raise RuntimeError("some other trouble")

        softmax_ce_plain = softmax_cross_entropy  # the usual call's way in: refused there too

    monkeypatch.setattr(losses, "_native", lambda z: Refusing())
    monkeypatch.setattr(losses, "_native_lib", lambda: Refusing())
    with pytest.raises(RuntimeError, match="^some other trouble$"):
        mb.softmax_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("label_smoothing", [0, 0.0, torch.tensor(0.0)])
def test_the_usual_call_and_the_checked_call_give_the_same_loss(label_smoothing):
    z = torch.randn(5, 3, dtype=D, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    got = mb.softmax_cross_entropy(z, y, label_smoothing=label_smoothing)
    torch.testing.assert_close(got, F.cross_entropy(z, y))


def test_half_logits_under_autocast_take_the_casting_path():
    """bf16 logits under autocast are not the usual call: the loss runs in float32, as
    F.cross_entropy's does there."""
    z = torch.randn(5, 3).to(torch.bfloat16).requires_grad_()
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mb.softmax_cross_entropy(z, y)
        want = F.cross_entropy(z, y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
