"""convert: what is converted, fused, skipped and kept; parity with the unconverted twin.

Real models (torch's Transformer, Hugging Face- and timm-style blocks) are in
test_convert_models.py.
"""

import copy
import logging

import pytest
import torch
from oracle import noncontiguous_randn
from torch import nn
from torch.testing import assert_close

from manualbp.convert import convert
from manualbp.modules import Linear

D = torch.float64


def assert_twin_matches(model, x):
    """Convert a deep copy of model; outputs, every parameter grad and the input grad must match."""
    twin = copy.deepcopy(model)
    _, report = convert(twin, report=True)
    outs, inputs = [], []
    for m in (model, twin):
        inputs.append(x.clone().requires_grad_(x.is_floating_point()))
        torch.manual_seed(7)  # same dropout masks: convert draws no random numbers
        outs.append(m(inputs[-1]))
    assert_close(outs[1], outs[0])
    grad = noncontiguous_randn(outs[0].shape)
    for out in outs:
        out.backward(grad)
    named = list(model.named_parameters())
    assert [n for n, _ in named] == [n for n, _ in twin.named_parameters()]
    for (name, p), q in zip(named, twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(q.grad, p.grad, msg=name)
    if x.is_floating_point():
        assert_close(inputs[1].grad, inputs[0].grad)
    return twin, report


def mlp_seq(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 6, bias=bias), nn.Tanh(),
        nn.Linear(6, 3, bias=bias),
    ).double()


@pytest.mark.parametrize("bias", [True, False])
def test_sequential_fuses_and_state_dict_round_trips(bias):
    model = mlp_seq(bias)
    state = model.state_dict()
    twin, report = assert_twin_matches(model, torch.randn(4, 5, dtype=D))
    assert report.fused == [("0", "1"), ("2", "3")] and report.converted == ["0", "2", "4"]
    assert [getattr(m, "activation", type(m).__name__) for m in twin] == [
        "relu", "Identity", "tanh", "Identity", "identity"
    ]
    assert all((twin[i].bias is None) != bias for i in (0, 2, 4))
    twin_state = twin.state_dict()
    assert list(twin_state) == list(state)
    assert all(torch.equal(twin_state[k], v) for k, v in state.items())
    x = torch.randn(4, 5, dtype=D)
    converted, plain = convert(mlp_seq(bias)), mlp_seq(bias)
    for m, source in ((converted, model), (plain, twin)):  # either way round
        m[0].weight.data.add_(1.0)
        m.load_state_dict(source.state_dict())
        assert_close(m(x), model(x))


FUSABLE = [
    (nn.ReLU(), "relu"), (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.SiLU(), "silu"),
    (nn.LeakyReLU(), "leaky_relu"), (nn.ELU(), "elu"), (nn.Softplus(), "softplus"),
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
]


@pytest.mark.parametrize(("act", "name"), FUSABLE, ids=[n for _, n in FUSABLE])
def test_each_supported_activation_fuses(act, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 2)).double()
    twin, report = assert_twin_matches(model, 2 * torch.randn(5, 4, dtype=D))
    assert report.fused == [("0", "1")] and twin[0].activation == name
    assert type(twin[1]) is nn.Identity


class OwnForward(nn.Sequential):
    def forward(self, x):
        return self[1](self[0](x)) + self[0](x)


def not_fused_cases():
    hooked = nn.Linear(4, 6)
    hooked.register_forward_hook(lambda m, i, out: out * 2)
    hooked_act = nn.ReLU()
    hooked_act.register_forward_hook(lambda m, i, out: out + 1)
    shared = nn.Linear(4, 6)
    return {
        "leaky_slope": (nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.2)), "negative_slope=0.01"),
        "elu_alpha": (nn.Sequential(nn.Linear(4, 6), nn.ELU(alpha=0.5)), "alpha=1.0"),
        "softplus_beta": (nn.Sequential(nn.Linear(4, 6), nn.Softplus(beta=2)), "beta=1.0"),
        "linear_hooks": (nn.Sequential(hooked, nn.Tanh()), "hooks, which would see g(z)"),
        "act_hooks": (nn.Sequential(nn.Linear(4, 6), hooked_act), "would be lost"),
        "shared": (nn.ModuleList([nn.Sequential(shared, nn.SiLU()), shared]), "several names"),
        "own_forward": (OwnForward(nn.Linear(4, 6), nn.ReLU()), None),
    }


@pytest.mark.parametrize("case", list(not_fused_cases()))
def test_unsafe_fusions_are_refused(case):
    model, why = not_fused_cases()[case]
    model.double()
    twin, report = convert(copy.deepcopy(model), report=True)
    assert report.fused == [] and report.converted
    assert not any(isinstance(m, nn.Identity) for m in twin.modules())
    if why is not None:
        assert any(why in w for _, w in report.skipped), report
    if not isinstance(model, nn.ModuleList):
        assert_twin_matches(model, torch.randn(3, 4, dtype=D))


def test_in_place_keeps_parameter_objects_rng_and_shared_layers():
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(3, 2))})
    params = list(model.parameters())
    rng = torch.get_rng_state()
    out, report = convert(model, report=True)
    assert out is model and model["a"] is model["b"][0] and type(shared) is Linear
    assert report.converted == ["a", "b.1"]
    assert all(p is q for p, q in zip(params, model.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    fresh = Linear(3, 3)  # conversion sets what Linear.__init__ sets, no more, no less
    assert set(vars(fresh)) == set(vars(shared)) and shared.activation == "identity"


def test_optimizer_built_before_convert_steps_like_the_twin():
    model = mlp_seq()
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.1) for m in (model, twin)]
    convert(model)
    for _ in range(3):
        x, grad = torch.randn(4, 5, dtype=D), torch.randn(3, 4, dtype=D).T
        for m, opt in zip((model, twin), opts, strict=True):
            opt.zero_grad()
            m(x).backward(grad)
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p, q)


def test_hooks_carry_over_and_their_handles_still_work():
    layer = nn.Linear(3, 2).double()
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda m, i: seen.append("pre")),
        layer.register_forward_hook(lambda m, i, o: seen.append("fwd")),
        layer.register_full_backward_hook(lambda m, gi, go: seen.append("bwd")),
    ]
    convert(layer)
    layer(torch.randn(4, 3, dtype=D, requires_grad=True)).sum().backward()
    assert seen == ["pre", "fwd", "bwd"] and type(layer) is Linear
    for handle in handles:
        handle.remove()
    layer(torch.randn(4, 3, dtype=D, requires_grad=True)).sum().backward()
    assert len(seen) == 3


def test_idempotent_and_skip_and_subclasses():
    weight_normed = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    model = nn.Sequential(
        mlp_seq(), nn.MultiheadAttention(3, 1), nn.Linear(3, 3), weight_normed
    )
    _, first = convert(model, skip=("2",), report=True)
    assert type(model[2]) is nn.Linear and type(model[3]) is not Linear
    assert [(n, why.split(" ")[0]) for n, why in first.skipped] == [
        ("2", "listed"), ("1.out_proj", "NonDynamicallyQuantizableLinear"),
        ("3", "ParametrizedLinear"),
    ]
    assert convert(nn.LazyLinear(3), report=True)[1].skipped[0][1].startswith("LazyLinear is not")
    before, state = repr(model), model.state_dict()
    _, second = convert(model, skip=("2",), report=True)
    assert second.converted == second.fused == [] and second.skipped == first.skipped
    assert repr(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_report_is_logged_and_readable(caplog):
    with caplog.at_level(logging.INFO, logger="manualbp.convert"):
        _, report = convert(mlp_seq(), report=True)
    text = str(report)
    assert text in caplog.text
    assert text.splitlines()[0] == (
        "convert: 3 Linear converted, 2 fused with their activation, 0 skipped"
    )
    assert "  fused     0 + 1" in text
    assert str(convert(nn.Linear(2, 2), report=True)[1]).endswith("converted <root>")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match=r"^convert: expected an nn.Module, got list$"):
        convert([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"convert: expected skip to be a collection of names, "
                                        r"got the str 'fc'; write skip=\('fc',\)"):
        convert(nn.Linear(2, 2), skip="fc")
    with pytest.raises(ValueError, match=r"expected skip to hold names from module.named_modules"
                                         r"\(\), got 'nope'"):
        convert(nn.Sequential(nn.Linear(2, 2)), skip=("nope",))
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="expected an eager nn.Module, got RecursiveScriptModule"):
        convert(scripted)
