"""Forward-mode AD: every manualbp Function's hand-written jvp against autograd's forward mode
on the same computation in torch ops (float64, random tangents on every input), through
torch.func.jvp, jacfwd, hessian and torch.autograd.forward_ad."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, hessian, jacfwd, jvp
from torch.testing import assert_close

import manualbp as mb

D = torch.float64
ACTS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "silu", "gelu",
        "gelu_tanh"]


def g_ref(name):
    if name == "identity":
        return lambda z: z
    if name == "gelu_tanh":
        return lambda z: F.gelu(z, approximate="tanh")
    return getattr(F, name)


def _away_from_kinks(shape):
    x = torch.randn(*shape, dtype=D)
    return x + 0.1 * torch.sign(x)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_linear_act_jvp(activation, bias, lead):
    torch.manual_seed(0)
    x, W = _away_from_kinks((*lead, 3)), torch.randn(5, 3, dtype=D)
    b = torch.randn(5, dtype=D) if bias else None
    primals = (x, W) + ((b,) if bias else ())
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, d_out = jvp(lambda *p: mb.linear_act(*p, activation=activation), primals, tangents)
    ref, d_ref = jvp(lambda *p: g_ref(activation)(F.linear(*p)), primals, tangents)
    assert_close(out, ref)
    assert_close(d_out, d_ref)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_forward_ad_dual_tensors_through_linear_and_mlp(activation):
    """The eager paths give way to the Functions that carry jvp when dual tensors are about."""
    torch.manual_seed(0)
    x, tx = _away_from_kinks((6, 3)), torch.randn(6, 3, dtype=D)
    lin = mb.Linear(3, 4, activation=activation, dtype=D)
    mlp = mb.MLP([3, 5, 4], activation=activation, dtype=D)
    y = torch.tensor([0, 3, 1, -100, 2, 2])
    W = [(m.weight.detach(), m.bias.detach()) for m in mlp.layers]

    def mlp_ref(a):
        a = g_ref(activation)(F.linear(a, *W[0]))
        return F.linear(a, *W[1])

    with forward_ad.dual_level():
        xd = forward_ad.make_dual(x, tx)
        pairs = [
            (lin(xd), g_ref(activation)(F.linear(xd, lin.weight.detach(), lin.bias.detach()))),
            (mlp(xd), mlp_ref(xd)),
            (mlp.loss(xd, y)[0], F.cross_entropy(mlp_ref(xd), y)),
        ]
        for mine, ref in pairs:
            assert_close(forward_ad.unpack_dual(mine).tangent, forward_ad.unpack_dual(ref).tangent)


def _mlp_and_ref(activation):
    torch.manual_seed(0)
    mlp = mb.MLP([3, 4, 4, 3], activation=activation, dtype=D)
    params = {k: v.detach() for k, v in mlp.named_parameters()}

    def ref_logits(p, x):
        a = x
        for i in range(3):
            a = F.linear(a, p[f"layers.{i}.weight"], p[f"layers.{i}.bias"])
            a = g_ref(activation)(a) if i < 2 else a
        return a

    return mlp, params, ref_logits


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus"])
def test_hessian_of_a_tiny_mlp_matches_autograd(activation):
    mlp, params, ref_logits = _mlp_and_ref(activation)
    x, y = _away_from_kinks((5, 3)), torch.tensor([0, 2, 1, -100, 1])

    def loss_mine(p):
        return _loss_with(mlp, p, x, y)

    def loss_ref(p):
        return F.cross_entropy(ref_logits(p, x), y)

    H, H_ref = hessian(loss_mine)(params), hessian(loss_ref)(params)
    for a in params:
        for b in params:
            assert_close(H[a][b], H_ref[a][b], msg=f"{a}, {b}")
    # and of the logits alone (MLPFunction without the folded loss), w.r.t. the input
    H_x = hessian(lambda x: functional_call(mlp, params, (x,)).sin().sum())(x)
    assert_close(H_x, hessian(lambda x: ref_logits(params, x).sin().sum())(x))


def _loss_with(mlp, p, x, y):
    """mlp.loss with the parameters p swapped in (functional_call calls forward, not loss)."""
    return functional_call(_Loss(mlp), {f"mlp.{k}": v for k, v in p.items()}, (x, y))


class _Loss(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, y):
        return self.mlp.loss(x, y)[0]


def test_jacfwd_and_hessian_of_a_converted_model():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 2)).double()
    model = mb.convert(copy.deepcopy(ref))
    x = torch.randn(5, 3, dtype=D)
    assert_close(jacfwd(model)(x), jacfwd(ref)(x))
    params = {k: v.detach() for k, v in ref.named_parameters()}
    H = hessian(lambda p: functional_call(model, p, (x,)).pow(3).sum())(params)
    H_ref = hessian(lambda p: functional_call(ref, p, (x,)).pow(3).sum())(params)
    for a in params:
        for b in params:
            assert_close(H[a][b], H_ref[a][b], msg=f"{a}, {b}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "weight", "smooth", "ignored", "weight+smooth+ignored",
                                  "probs", "probs+weight+smooth", "spatial"])
def test_cross_entropy_jvp(reduction, case):
    torch.manual_seed(0)
    shape = (3, 4, 2) if case == "spatial" else (5, 4)
    z = torch.randn(*shape, dtype=D)
    if case.startswith("probs"):
        target = torch.softmax(torch.randn(*shape, dtype=D), 1)
    else:
        target = torch.randint(0, 4, shape[:1] + shape[2:])
        if "ignored" in case:
            target.view(-1)[::2] = -100
    kw = dict(reduction=reduction,
              weight=torch.rand(4, dtype=D) + 0.1 if "weight" in case else None,
              label_smoothing=0.2 if "smooth" in case else 0.0)
    primals = (z, target) if case.startswith("probs") else (z,)
    tangents = tuple(torch.randn_like(p) for p in primals)
    if case.startswith("probs"):
        def mine(z, t): return mb.softmax_cross_entropy(z, t, **kw)
        def ref(z, t): return F.cross_entropy(z, t, **kw)
    else:
        def mine(z): return mb.softmax_cross_entropy(z, target, **kw)
        def ref(z): return F.cross_entropy(z, target, **kw)
    out, d_out = jvp(mine, primals, tangents)
    expected, d_expected = jvp(ref, primals, tangents)
    assert_close(out, expected)
    assert_close(d_out, d_expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", [False, True])
def test_bce_and_mse_jvp(reduction, weights):
    torch.manual_seed(0)
    z, y = torch.randn(4, 3, dtype=D), torch.rand(4, 3, dtype=D)
    tangents = (torch.randn_like(z), torch.randn_like(y))
    kw = dict(reduction=reduction)
    if weights:
        kw.update(weight=torch.rand(3, dtype=D), pos_weight=torch.rand(3, dtype=D) + 0.5)
    pairs = [
        (lambda z, y: mb.sigmoid_binary_cross_entropy(z, y, **kw),
         lambda z, y: F.binary_cross_entropy_with_logits(z, y, **kw)),
        (lambda z, y: mb.mse_loss(z, y, reduction),
         lambda z, y: F.mse_loss(z, y, reduction=reduction)),
    ]
    for mine, ref in pairs:
        out, d_out = jvp(mine, (z, y), tangents)
        expected, d_expected = jvp(ref, (z, y), tangents)
        assert_close(out, expected)
        assert_close(d_out, d_expected)
