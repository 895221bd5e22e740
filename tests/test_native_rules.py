"""Learning rules on the C++ core against the Python passes: bit for bit, every path.

As tests/test_native.py: each computation runs natively and with the native Functions paused
(the Python reference), from the same weights and inputs, fed random signed non-contiguous
upstream gradients; values and every gradient (Kolen-Pollack's B.grad and DFA included) must be
torch.equal, and the node that ran is asserted, so a rule that silently took the Python path (or
backprop's) fails. tests/test_rules.py checks both backends against float64 autograd.
"""

import contextlib
import warnings

import pytest
import torch
from oracle import leaves, noncontiguous_randn
from test_native import assert_equal, mlp_run, node, twice
from torch import nn

import manualbp as mb
from manualbp import native

PER_LAYER = ["feedback_alignment", "sign_symmetry", "kolen_pollack"]
MLP_RULES = [*PER_LAYER, "direct_feedback_alignment"]
ACTS = ["relu", "tanh", "gelu"]  # a one-kernel delta from a, a delta from a, g' from z
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module", autouse=True)
def built():
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")


def grads_of(module):
    """Every parameter's .grad by name (Kolen-Pollack's feedback among them)."""
    return {name: p.grad for name, p in module.named_parameters()}


def assert_same(mine, ref, what):
    assert mine.keys() == ref.keys(), what
    for name in mine:
        assert_equal(mine[name], ref[name], f"{what}: {name}")


@pytest.mark.parametrize("with_loss", [False, True], ids=["logits", "loss"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rule", MLP_RULES)
def test_mlp_node_under_a_rule_is_bit_identical(rule, act, bias, lead, dtype, with_loss):
    torch.manual_seed(50)
    mlp = mb.MLP([5, 7, 6, 4], activation=act, bias=bias, dtype=dtype, rule=rule)
    x, y = torch.randn(*lead, 5, dtype=dtype), torch.randint(0, 4, lead)
    g = noncontiguous_randn((*lead, 4), dtype)

    mine, ref = twice(mlp_run(mlp, x, y, g, with_loss))
    names = [name for name, _ in mlp.named_parameters()]
    mine, ref = (r[:4] + (dict(zip(names, r[4], strict=True)),) for r in (mine, ref))
    assert "MLPNode" in mine[0] and ref[0].startswith("MLPEagerFunction")
    for what, a, b in zip(["logits", "loss", "x.grad"], mine[1:4], ref[1:4], strict=True):
        assert_equal(a if a is None else a.detach(), b if b is None else b.detach(), what)
    assert_same(mine[4], ref[4], rule)
    if rule == "kolen_pollack":
        assert all(mine[4][f"layers.{i}.feedback"] is not None for i in range(3))


@pytest.mark.parametrize("frozen", ["weight", "feedback"])
@pytest.mark.parametrize("rule", MLP_RULES)
def test_frozen_weights_or_feedback_get_no_gradient_and_the_rest_stay_identical(rule, frozen):
    torch.manual_seed(51)
    mlp = mb.MLP([5, 7, 6, 4], activation="tanh", rule=rule)
    param = getattr(mlp.layers[1], frozen)
    if isinstance(param, nn.Parameter):  # a buffer (FA, sign symmetry, DFA) has none to freeze
        param.requires_grad_(False)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))

    def run():
        mlp.zero_grad(set_to_none=True)
        mlp.loss(x, y)[0].backward()  # x needs no gradient: the first layer sends none down
        node_grads = grads_of(mlp)
        mlp.backprop(x, y, accumulate=False)
        return node_grads, grads_of(mlp)

    mine, ref = twice(run)
    for m, r in zip(mine, ref, strict=True):
        assert_same(m, r, f"{rule}, frozen {frozen}")
        if rule == "kolen_pollack":  # B gets grad_W even where W is frozen, and vice versa
            assert (m["layers.1.weight"] is None) == (frozen == "weight")
            assert (m["layers.1.feedback"] is None) == (frozen == "feedback")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rule", MLP_RULES)
def test_backprop_step_under_a_rule_is_bit_identical_and_accumulates(rule, act, bias, lead,
                                                                      dtype):
    torch.manual_seed(52)
    mlp = mb.MLP([5, 7, 6, 4], activation=act, bias=bias, dtype=dtype, rule=rule)
    x, y = torch.randn(*lead, 5, dtype=dtype), torch.randint(0, 4, lead)
    y.view(-1)[1] = -100  # left out of the mean, as F.cross_entropy

    def run():
        mlp.zero_grad(set_to_none=True)
        first = mlp.backprop(x, y)
        once = {k: None if g is None else g.clone() for k, g in grads_of(mlp).items()}
        second = mlp.backprop(x, y)  # accumulates
        again = {k: g.clone() for k, g in grads_of(mlp).items()}
        mlp.backprop(x, y, accumulate=False)  # replaces
        return first, second, once, again, grads_of(mlp)

    mine, ref = twice(run)
    assert_equal(mine[0], ref[0], "loss")
    assert_equal(mine[1], ref[1], "loss again")
    for k in (2, 3, 4):
        assert_same(mine[k], ref[k], f"{rule}, grads {k}")
    if rule == "kolen_pollack":  # B.grad is its own tensor, not W.grad
        for layer in mlp.layers:
            assert layer.feedback.grad is not None
            assert layer.feedback.grad.data_ptr() != layer.weight.grad.data_ptr()


def clones(fn) -> int:
    """How many aten::clone calls fn makes (the profiler sees the C++ core's ops too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.key == "aten::clone" for e in prof.key_averages() for _ in range(e.count))


@pytest.mark.parametrize("backend", ["C++", "Python"])
@pytest.mark.parametrize("frozen_W", [False, True], ids=["W trained", "W frozen"])
def test_kolen_pollack_copies_grad_W_only_where_B_grad_would_share_it(frozen_W, backend):
    with native.paused() if backend == "Python" else contextlib.nullcontext():
        kolen_pollack_copies(frozen_W)


def kolen_pollack_copies(frozen_W):
    torch.manual_seed(53)
    mlp = mb.MLP([5, 7, 6, 4], rule="kolen_pollack")
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    for layer in mlp.layers:
        layer.weight.requires_grad_(not frozen_W)
    L = len(mlp.layers)
    fresh = clones(lambda: mlp.backprop(x, y))  # no .grad yet: B.grad = a copy of grad_W
    before = [layer.feedback.grad.clone() for layer in mlp.layers]
    adds = clones(lambda: mlp.backprop(x, y))  # B.grad.add_(grad_W): no copy needed
    for layer, old in zip(mlp.layers, before, strict=True):
        assert_equal(layer.feedback.grad, old + old, "B.grad accumulated")
    replaced = clones(lambda: mlp.backprop(x, y, accumulate=False))
    assert (fresh, adds, replaced) == ((0, 0, 0) if frozen_W else (L, 0, L))
    with native.paused():  # the Python pass, as the reference for the values
        ref = mb.MLP([5, 7, 6, 4], rule="kolen_pollack")
        ref.load_state_dict(mlp.state_dict())
        ref.backprop(x, y, accumulate=False)
    for layer, ref_layer in zip(mlp.layers, ref.layers, strict=True):
        B_grad = layer.feedback.grad
        assert_equal(B_grad, ref_layer.feedback.grad, "B.grad")
        if not frozen_W:
            assert B_grad.untyped_storage().data_ptr() != layer.weight.grad.untyped_storage(
            ).data_ptr()


@pytest.mark.parametrize("rule", MLP_RULES)
def test_backprop_under_a_rule_never_runs_the_python_pass(rule, monkeypatch):
    mlp = mb.MLP([5, 7, 4], rule=rule)

    def python_pass(*args, **kwargs):
        raise AssertionError("MLP.backprop took the Python pass")

    monkeypatch.setattr(mb.MLP, "_backprop", python_pass)
    assert mlp.backprop(torch.randn(3, 5), torch.tensor([0, 3, 1])).isfinite()
    assert all(p.grad is not None for p in mlp.parameters())
    with native.paused(), pytest.raises(AssertionError, match="took the Python pass"):
        mlp.backprop(torch.randn(3, 5), torch.tensor([0, 3, 1]))


def sequential(rule, act, bias, dtype):
    return nn.Sequential(mb.Linear(5, 7, bias=bias, activation=act, dtype=dtype, rule=rule),
                         mb.Linear(7, 4, bias=bias, dtype=dtype, rule=rule))


def convert_of(rule, act, bias, dtype):
    g = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[act]
    model = nn.Sequential(nn.Linear(5, 7, bias=bias, dtype=dtype), g,
                          nn.Linear(7, 4, bias=bias, dtype=dtype))
    return mb.convert(model, rule=rule)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("make", [sequential, convert_of], ids=["Linear", "convert"])
@pytest.mark.parametrize("rule", PER_LAYER)
def test_per_layer_rules_are_bit_identical(rule, make, act, bias, lead, dtype):
    torch.manual_seed(53)
    model = make(rule, act, bias, dtype)
    x, y = torch.randn(*lead, 5, dtype=dtype), torch.randint(0, 4, lead)
    g = noncontiguous_randn((*lead, 4), dtype)

    def run():
        model.zero_grad(set_to_none=True)
        xs = x.detach().clone().requires_grad_()
        hidden = model[0](xs)
        out = model[1:](hidden)
        loss = (out * g).sum()
        if lead:  # through the loss function too, whose C++ twin is already tested
            loss = loss - mb.softmax_cross_entropy(out.reshape(-1, 4), y.reshape(-1))
        loss.backward()
        return node(hidden), out.detach(), xs.grad, grads_of(model)

    mine, ref = twice(run)
    assert "LinearActNode" in mine[0] and ref[0].startswith("LinearAct")
    assert_equal(mine[1], ref[1], "output")
    assert_equal(mine[2], ref[2], "x.grad")
    assert_same(mine[3], ref[3], rule)
    if rule == "kolen_pollack":
        assert mine[3]["0.feedback"] is not None


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("needs", ["all", "B only", "x and B"])
def test_linear_act_with_a_feedback_that_wants_a_gradient(act, needs):
    torch.manual_seed(54)
    x, W, b, B = (torch.randn(*s, dtype=torch.float64) for s in [(3, 5), (4, 5), (4,), (4, 5)])
    g = noncontiguous_randn((3, 4))

    def run():
        xs, Ws, bs, Bs = leaves(x, W, b, B)
        if needs != "all":
            Ws.requires_grad_(False)
            bs.requires_grad_(False)
        if needs == "B only":
            xs.requires_grad_(False)
        out = mb.linear_act(xs, Ws, bs, act, feedback=Bs)
        out.backward(g)
        return node(out), out.detach(), [t.grad for t in (xs, Ws, bs, Bs)]

    mine, ref = twice(run)
    assert "LinearActNode" in mine[0]
    assert_equal(mine[1], ref[1], "a")
    for i, (p, q) in enumerate(zip(mine[2], ref[2], strict=True)):
        assert_equal(p, q, f"grad of input {i}")
    assert mine[2][3] is not None


def test_every_rule_runs_on_the_native_nodes():
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    for rule in MLP_RULES:
        mlp = mb.MLP([4, 5, 3], rule=rule)
        assert "MLPNode" in node(mlp.loss(x, y)[0]) and "MLPNode" in node(mlp(x)), rule
        if rule in PER_LAYER:
            assert "LinearActNode" in node(mb.Linear(4, 3, rule=rule)(x)), rule
    fa = mb.MLP([4, 5, 3], rule="fa")  # what the C++ does not implement stays in Python
    assert node(fa(x, trace=mb.Trace())).startswith("MLPFunction")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node(fa(x)).startswith("MLPFunction")
        assert node(mb.Linear(4, 3, rule="kp")(x)).startswith("LinearActFunction")


def test_kolen_pollack_with_a_parametrized_weight_reads_no_non_leaf_grad():
    """The copy rule for B.grad must not read .grad of a W that a parametrization computes
    (torch warns: it is never populated); B.grad still accumulates grad_W."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(54)
    mlp = mb.MLP([5, 7, 4], rule="kolen_pollack")
    weight_norm(mlp.layers[0])
    x, y = torch.randn(3, 5), torch.tensor([0, 3, 1])
    with native.paused(), warnings.catch_warnings():
        warnings.simplefilter("error")
        mlp.backprop(x, y)
        once = mlp.layers[0].feedback.grad.clone()
        mlp.backprop(x, y)
    assert_equal(mlp.layers[0].feedback.grad, once + once, "B.grad accumulated")
