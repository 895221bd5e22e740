"""manualbp.Chain: a converted nn.Sequential's runs of Linears as one MLP node each.

The oracle is the same model run layer by layer (nn.Sequential.forward on the converted model):
outputs and every gradient bit for bit, on both backends; and float64 autograd of the model
before conversion. Every fallback is proved to fall back (a counter on the node's call).
"""

import copy
import io
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from test_per_example import check, weighted
from torch import nn
from torch.testing import assert_close

import manualbp as mb
from manualbp import chain as chain_module
from manualbp.rules import attach

ACTS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.GELU,
        lambda: nn.GELU(approximate="tanh")]
ACT_IDS = ["relu", "tanh", "sigmoid", "silu", "elu", "leaky_relu", "softplus", "gelu",
           "gelu_tanh"]
WIDTHS = [5, 7, 6, 3]


@pytest.fixture
def nodes(monkeypatch):
    """A list that grows by one at every call of the MLP node from a Chain."""
    calls = []
    real = chain_module.run_node

    def counted(*args):
        calls.append(args[4])  # the activations
        return real(*args)

    monkeypatch.setattr(chain_module, "run_node", counted)
    return calls


def stack(act=nn.ReLU, bias=True, dtype=torch.float64, last_act=False, widths=WIDTHS):
    torch.manual_seed(0)
    mods = []
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        mods += [nn.Linear(n_in, n_out, bias=bias, dtype=dtype), act()]
    return nn.Sequential(*(mods if last_act else mods[:-1]))


def upstream(shape, dtype=torch.float64):
    """A random signed upstream gradient, strided, and for (B, T, n) also transposed in (B, T),
    so that reading it as (B T, n) rows needs a copy."""
    if len(shape) < 3:
        return noncontiguous_randn(shape, dtype)
    return noncontiguous_randn((shape[1], shape[0], *shape[2:]), dtype).transpose(0, 1)


def step(model, forward, x, g):
    """(output, x.grad, [p.grad]) of forward(x) and backward(g), from cleared gradients."""
    x = x.detach().requires_grad_(x.requires_grad)
    for p in model.parameters():
        p.grad = None
    out = forward(x)
    out.backward(g)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return out.detach(), x.grad, grads


def assert_identical(a, b):
    """Two steps' outputs and gradients, bit for bit."""
    for t, u in zip(a[:2], b[:2], strict=True):
        assert (t is None) == (u is None)
        if t is not None:
            assert t.dtype == u.dtype and torch.equal(t, u)
    for i, (t, u) in enumerate(zip(a[2], b[2], strict=True)):
        assert (t is None) == (u is None), i
        if t is not None:
            assert torch.equal(t, u), f"parameter {i}"


def chain_vs_layers(model, x, g, nodes, called=1):
    """The Chain's step equals the layer-by-layer step bit for bit; the node ran `called` times
    for the Chain and never for the layers. Returns the Chain's step."""
    before = len(nodes)
    mine = step(model, model, x, g)
    assert len(nodes) - before == called
    layers = step(model, lambda v: nn.Sequential.forward(model, v), x, g)
    assert len(nodes) - before == called
    assert_identical(mine, layers)
    return mine


def assert_as_autograd(reference, x, g, mine):
    """mine (a step) against float64 autograd of the unconverted model."""
    ref = step(reference, reference, x, g)
    assert_close(mine[0], ref[0], rtol=1e-10, atol=1e-12)
    if x.requires_grad:
        assert_close(mine[1], ref[1], rtol=1e-10, atol=1e-12)
    for t, u in zip(mine[2], ref[2], strict=True):
        assert (t is None) == (u is None)
        if t is not None:
            assert_close(t, u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("last_act", [False, True])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_chain_is_the_layers_bit_for_bit(act, last_act, bias, lead, dtype, nodes):
    reference = stack(act, bias, dtype, last_act)
    model, report = mb.convert(copy.deepcopy(reference), report=True)
    assert type(model) is mb.Chain and report.chained == [""]
    assert len(report.fused) == (3 if last_act else 2)  # every activation fused
    x = torch.randn(4, *lead, WIDTHS[0], dtype=dtype, requires_grad=True)
    g = upstream((4, *lead, WIDTHS[-1]), dtype)
    mine = chain_vs_layers(model, x, g, nodes)
    if dtype == torch.float64:
        assert_as_autograd(reference, x, g, mine)


def test_with_leading_dims_a_last_g_reads_the_gradient_as_it_arrives(nodes):
    """The node reads dL/da[L] (B, T, n) as contiguous rows; gelu's and softplus' g' kernels
    round differently on strided memory, so the last layer of such a run runs on its own."""
    for act in (nn.GELU, nn.Softplus, nn.ReLU):
        model = mb.convert(stack(act, last_act=True))
        for lead in ((3,), (2, 3), ()):
            x = torch.randn(4, *lead, WIDTHS[0], dtype=torch.float64, requires_grad=True)
            chain_vs_layers(model, x, upstream((4, *lead, WIDTHS[-1])), nodes)
            assert len(nodes[-1]) == (2 if lead else 3)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU], ids=["relu", "gelu"])
def test_a_strided_input_with_leading_dims_runs_layer_by_layer(act, nodes):
    """F.linear on a strided (B, T, n) input is matmul + bias, not the addmm the node runs on
    its rows: the layers take it (a 2-D strided input is the same either way)."""
    model = mb.convert(stack(act, dtype=torch.float32))
    x = upstream((4, 3, WIDTHS[0]), torch.float32).requires_grad_()
    chain_vs_layers(model, x, upstream((4, 3, WIDTHS[-1]), torch.float32), nodes, called=0)
    x = noncontiguous_randn((4, WIDTHS[0]), torch.float32).requires_grad_()
    chain_vs_layers(model, x, noncontiguous_randn((4, WIDTHS[-1]), torch.float32), nodes)


@pytest.mark.parametrize("rule", ["fa", "ss", "kp"])
def test_rules_are_the_layers_bit_for_bit(rule, nodes):
    reference = stack(nn.Tanh)
    torch.manual_seed(1)
    model = mb.convert(copy.deepcopy(reference), rule=rule)
    x = torch.randn(6, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((6, WIDTHS[-1]))
    mine = chain_vs_layers(model, x, g, nodes)
    if rule == "kp":  # B gets W's gradient
        Bs = [m.feedback for m in model if isinstance(m, mb.Linear)]
        assert all(B.grad is not None for B in Bs)
        assert_close(Bs[0].grad, mine[2][0], rtol=0, atol=0)


def test_frozen_layers_and_an_input_without_grad(nodes):
    model = mb.convert(stack(nn.GELU))
    model[2].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    x = torch.randn(4, 3, WIDTHS[0], dtype=torch.float64)
    g = noncontiguous_randn((4, 3, WIDTHS[-1]))
    mine = chain_vs_layers(model, x, g, nodes)
    assert mine[1] is None and mine[2][1] is None and mine[2][2] is None
    x.requires_grad_()
    chain_vs_layers(model, x, g, nodes)


def test_flatten_and_dropout_around_runs(nodes):
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Flatten(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3),
        nn.Linear(8, 6), nn.SiLU(), nn.Linear(6, 4), nn.Dropout(0.2), nn.Linear(4, 3)).double()
    model = mb.convert(copy.deepcopy(reference))
    x = torch.randn(5, 2, 5, dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((5, 3))
    outs = []
    for forward in (model, lambda v: nn.Sequential.forward(model, v), reference):
        torch.manual_seed(7)  # the same dropout masks
        outs.append(step(reference if forward is reference else model, forward, x, g))
    assert [a for a in nodes] == [("relu", "tanh"), ("silu", "identity")]
    assert_identical(outs[0], outs[1])
    for t, u in zip(outs[0][2], outs[2][2], strict=True):
        assert_close(t, u, rtol=1e-10, atol=1e-12)
    model.eval()
    chain_vs_layers(model, x, g, nodes, called=2)


def test_parameters_read_at_every_call(nodes):
    """A parameter replaced, frozen or cast after a first call shows at once."""
    model = mb.convert(stack(nn.ReLU, dtype=torch.float32))
    x = torch.randn(4, WIDTHS[0], requires_grad=True)
    chain_vs_layers(model, x, noncontiguous_randn((4, WIDTHS[-1]), torch.float32), nodes)
    model.double()
    model[2].weight = nn.Parameter(torch.randn(6, 7, dtype=torch.float64))
    model[4].bias.requires_grad_(False)
    x = x.detach().double().requires_grad_()
    mine = chain_vs_layers(model, x, noncontiguous_randn((4, WIDTHS[-1])), nodes)
    assert mine[2][2] is not None and mine[2][5] is None


def _hooked_sequential(m):
    m.register_forward_hook(lambda mod, i, o: None)


def _pre_hooked_linear(m):
    m[2].register_forward_pre_hook(lambda mod, i: None)


def _backward_hooked_linear(m):
    m[0].register_full_backward_hook(lambda mod, gi, go: None)


def _hooked_identity(m):
    m[1].register_forward_hook(lambda mod, i, o: None)


def _mixed_rules(m):
    attach(m[2], "feedback_alignment")


def _parametrized(m):
    torch.nn.utils.parametrizations.weight_norm(m[2])


def _plain_tensor_weight(m):
    W = m[0].weight.detach().clone().requires_grad_()
    del m[0].weight
    m[0].weight = W


def _own_forward(m):
    layer = m[2]
    layer.forward = lambda x: mb.Linear.forward(layer, x)


def _compiled_layer(m):
    m[2].__dict__["_compiled_call_impl"] = m[2]._call_impl  # what module.compile() sets, uncompiled


FALLBACKS = [_compiled_layer, _hooked_sequential, _pre_hooked_linear, _backward_hooked_linear,
             _hooked_identity, _mixed_rules, _parametrized, _plain_tensor_weight, _own_forward]


@pytest.mark.parametrize("change", FALLBACKS, ids=lambda f: f.__name__.strip("_"))
def test_what_the_node_would_not_do_runs_layer_by_layer(change, nodes):
    reference = stack(nn.Tanh)
    model = mb.convert(copy.deepcopy(reference))
    change(model)
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((4, WIDTHS[-1]))
    mine = chain_vs_layers(model, x, g, nodes, called=0)
    if change is not _mixed_rules:
        twin = copy.deepcopy(reference)
        if change is _parametrized:  # compare with the weight it computes
            with torch.no_grad():
                twin[2].weight.copy_(model[2].weight)
            mine = (mine[0], mine[1], None)
        elif change is _plain_tensor_weight:
            with torch.no_grad():
                twin[0].weight.copy_(model[0].weight)
            mine = (mine[0], mine[1], None)
        ref = step(twin, twin, x, g)
        assert_close(mine[0], ref[0], rtol=1e-10, atol=1e-12)
        assert_close(mine[1], ref[1], rtol=1e-10, atol=1e-12)
        if mine[2] is not None:
            for t, u in zip(mine[2], ref[2], strict=True):
                assert_close(t, u, rtol=1e-10, atol=1e-12)


def test_global_module_hooks_run_layer_by_layer(nodes):
    model = mb.convert(stack())
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: seen.append(type(mod).__name__))
    try:
        x = torch.randn(4, WIDTHS[0], dtype=torch.float64, requires_grad=True)
        chain_vs_layers(model, x, noncontiguous_randn((4, WIDTHS[-1])), nodes, called=0)
    finally:
        handle.remove()
    assert seen.count("Linear") == 2 * 3  # each layer's hook, on both runs
    model(x)
    assert len(nodes) == 1


def test_a_layer_twice_runs_layer_by_layer(nodes):
    torch.manual_seed(0)
    shared = nn.Linear(5, 5, dtype=torch.float64)
    reference = nn.Sequential(shared, shared, nn.Linear(5, 3, dtype=torch.float64))
    model = mb.convert(copy.deepcopy(reference))
    assert type(model) is mb.Chain
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((4, 3))
    mine = chain_vs_layers(model, x, g, nodes, called=0)
    assert_as_autograd(reference, x, g, mine)


def test_torch_func_and_forward_mode_run_layer_by_layer(nodes):
    reference = stack(nn.Tanh)
    model = mb.convert(copy.deepcopy(reference))
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, module):
        return torch.func.functional_call(module, p, (x,)).sin().sum()

    mine = torch.func.grad(loss)(params, model)
    ref = torch.func.grad(loss)(params, reference)
    for k in params:
        assert_close(mine[k], ref[k], rtol=1e-10, atol=1e-12)
    tangent = torch.randn_like(x)
    out, jvp = torch.func.jvp(model, (x,), (tangent,))
    out_r, jvp_r = torch.func.jvp(reference, (x,), (tangent,))
    assert_close(jvp, jvp_r, rtol=1e-10, atol=1e-12)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert_close(traced(x), reference(x), rtol=1e-10, atol=1e-12)
    assert nodes == []


def test_autocast_and_half_dtypes_are_the_layers(nodes):
    model = mb.convert(stack(nn.GELU, dtype=torch.float32))
    x = torch.randn(4, 3, WIDTHS[0], requires_grad=True)
    g = noncontiguous_randn((4, 3, WIDTHS[-1]), torch.bfloat16)

    def under_autocast(forward):
        def run(v):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(v)
        return run

    before = len(nodes)
    mine = step(model, under_autocast(model), x, g)
    layers = step(model, under_autocast(lambda v: nn.Sequential.forward(model, v)), x, g)
    assert len(nodes) == before + 1 and mine[0].dtype == torch.bfloat16
    assert_identical(mine, layers)
    model.bfloat16()
    chain_vs_layers(model, x.detach().bfloat16().requires_grad_(), g, nodes)


@pytest.mark.parametrize("nested", [False, True])
def test_zero_grad_clears_every_gradient(nested):
    model = mb.convert(stack(nn.Tanh))
    if nested:  # a child with submodules: the generic walk
        model.append(nn.Sequential(nn.Linear(3, 2, dtype=torch.float64)))
        torch.nn.utils.parametrizations.weight_norm(model[2])
    for set_to_none in (True, False):
        model(torch.randn(4, WIDTHS[0], dtype=torch.float64)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none)
        for p in model.parameters():
            assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def test_no_grad_and_inference_mode(nodes):
    model = mb.convert(stack(nn.Softplus, dtype=torch.float32, last_act=True))
    x = torch.randn(4, 3, WIDTHS[0])
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(model(x), nn.Sequential.forward(model, x))
    assert len(nodes) == 2


def test_double_backward_matches_the_layers(nodes):
    model = mb.convert(stack(nn.Tanh))
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    results = []
    for forward in (model, lambda v: nn.Sequential.forward(model, v)):
        out = forward(x)
        (gx,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), list(model.parameters())))
    assert len(nodes) == 1
    for t, u in zip(*results, strict=True):
        assert_close(t, u, rtol=1e-12, atol=1e-14)


BAD_INPUTS = [
    ("width", lambda: torch.randn(4, 6, dtype=torch.float64)),
    ("dtype", lambda: torch.randn(4, 5, dtype=torch.float32)),
    ("integer", lambda: torch.ones(4, 5, dtype=torch.int64)),
    ("0-dim", lambda: torch.tensor(1.0, dtype=torch.float64)),
    ("not a tensor", lambda: [[1.0] * 5]),
    ("complex", lambda: torch.randn(4, 5, dtype=torch.complex128)),
]


@pytest.mark.parametrize("make", [m for _, m in BAD_INPUTS], ids=[n for n, _ in BAD_INPUTS])
def test_bad_input_gets_the_layers_error(make):
    model = mb.convert(stack())
    with pytest.raises(Exception) as layers:
        nn.Sequential.forward(model, make())
    with pytest.raises(type(layers.value), match=re.escape(str(layers.value))):
        model(make())


def test_bad_model_gets_the_layers_error(nodes):
    torch.manual_seed(0)
    widths = mb.convert(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(6, 3)))
    dtypes = mb.convert(stack(dtype=torch.float32))
    dtypes[2].double()
    device = mb.convert(stack(dtype=torch.float32))
    device[2].to("meta")
    for model in (widths, dtypes, device):
        x = torch.randn(4, 5)
        with pytest.raises(Exception) as layers:
            nn.Sequential.forward(model, x)
        with pytest.raises(type(layers.value), match=re.escape(str(layers.value))):
            model(x)


def test_a_refusal_the_checks_miss_runs_the_layers(monkeypatch):
    """Whatever the node refuses runs layer by layer: their result, or their own error."""
    def refuse(*args):
        raise RuntimeError("the node refused")

    monkeypatch.setattr(chain_module, "run_node", refuse)
    model = mb.convert(stack(nn.Tanh))
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((4, WIDTHS[-1]))
    assert_identical(step(model, model, x, g),
                     step(model, lambda v: nn.Sequential.forward(model, v), x, g))


def test_unconvert_state_dict_and_copies(nodes):
    reference = stack(nn.SiLU)
    model = mb.convert(copy.deepcopy(reference))
    children = list(model)
    ref_state = reference.state_dict()
    state = model.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    g = noncontiguous_randn((4, WIDTHS[-1]))
    first = step(model, model, x, g)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied) is mb.Chain
        assert_identical(step(copied, copied, x, g), first)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_identical(step(loaded, loaded, x, g), first)
    assert type(model[0:3]) is mb.Chain  # a slice is one too
    _, report = mb.unconvert(model, report=True)
    assert type(model) is nn.Sequential and report.chained == [""]
    assert list(model)[0] is children[0] and type(model[1]) is nn.SiLU
    assert "unchained <root>" in str(report)
    assert list(model.state_dict()) == list(ref_state)


def test_convert_twice_and_what_is_chained():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)),  # a run
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),  # one Linear: no run
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 4)),  # not consecutive
        nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),  # not a Sequential
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),  # skipped
    )
    _, report = mb.convert(model, report=True, skip=("4",))
    assert report.chained == ["0"]
    assert [type(m).__name__ for m in model] == ["Chain", "Sequential", "Sequential",
                                                  "ModuleList", "Sequential"]
    assert "chained   0" in str(report)
    _, again = mb.convert(model, report=True, skip=("4",))
    assert again.chained == again.converted == again.fused == []  # nothing changes
    _, unskipped = mb.convert(model, report=True)
    assert unskipped.chained == ["4"] and unskipped.converted == ["4.0", "4.1"]
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    _, unfused = mb.convert(plain, report=True, fuse=False)
    assert unfused.chained == [] and type(plain) is nn.Sequential


@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("bias", [True, False])
def test_per_example_norms_and_clip_match_vmap_grad(bias, lead, max_norm, nodes):
    reference = stack(nn.Tanh, bias, widths=[5, 7, 6, 4])
    model = mb.convert(copy.deepcopy(reference))
    torch.manual_seed(5)
    x = torch.randn(6, *lead, 5, dtype=torch.float64)
    G = noncontiguous_randn((6, *lead, 4))

    def run(m):
        out = m(x)
        weighted("mean")(out, G).backward()

    check(model, run, reference, x, G, lambda out, G_n: (out * G_n).sum(), "mean", max_norm)
    assert len(nodes) == 1


def test_per_example_frozen_layer_and_cross_entropy(nodes):
    reference = stack(nn.ReLU, widths=[5, 7, 6, 4])
    reference[2].weight.requires_grad_(False)
    model = mb.convert(copy.deepcopy(reference))
    torch.manual_seed(5)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))

    def run(m):
        F.cross_entropy(m(x), y, reduction="sum").backward()

    check(model, run, reference, x, y, lambda out, y_n: F.cross_entropy(out[None], y_n[None]),
          "sum", 0.5, frozen=(2,))
    assert len(nodes) == 1
