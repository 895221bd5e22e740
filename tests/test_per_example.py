"""mb.per_example against the oracle: torch.func vmap(grad) of each example's own loss, float64.

Every path: per-layer Functions (mb.Linear, convert), the MLP node (with an outside loss and
with the folded softmax cross-entropy) and MLP.backprop; norms to 1e-10 relative, clipped
gradients to 1e-10, for mean and sum, with and without bias, frozen layers, leading dims.
The outside loss is a random signed weighting of the outputs, never a plain sum or mean.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from test_activations import TORCH_G
from test_mlp import autograd_twin
from torch import nn
from torch.func import functional_call, grad, vmap

import manualbp as mb
from manualbp import native

TOL = dict(rtol=1e-10, atol=1e-12)
SIZES = [5, 7, 6, 4]


def linear_stack(name, bias=True):
    torch.manual_seed(3)
    acts = [name, name, "identity"]
    return nn.Sequential(*(mb.Linear(i, o, bias=bias, activation=a, dtype=torch.float64)
                           for i, o, a in zip(SIZES[:-1], SIZES[1:], acts, strict=True)))


def twin_of(model):
    """The same network in nn.Linear + torch's g (shared by an MLP or a stack of mb.Linear)."""
    if isinstance(model, mb.MLP):
        return autograd_twin(model)
    holder = mb.MLP(SIZES, dtype=torch.float64, bias=model[0].bias is not None)
    holder.layers = nn.ModuleList(copy.deepcopy(list(model)))
    return autograd_twin(holder)


def oracle(twin, x, per_example_loss, aux, frozen=()):
    """{index of parameter: (B, *p.shape)} each example's gradient of its own loss term."""
    params = {k: v.detach() for k, v in twin.named_parameters()}
    keys = list(params)
    trainable = [k for i, k in enumerate(keys) if i not in frozen]

    def f(train, x_n, aux_n):
        out = functional_call(twin, {**params, **train}, (x_n.unsqueeze(0),))
        return per_example_loss(out[0], aux_n)

    g = vmap(grad(f), in_dims=(None, 0, 0))({k: params[k] for k in trainable}, x, aux)
    return {keys.index(k): v for k, v in g.items()}


def expected(g, reduction, max_norm):
    """(norms, {index: norm}, {index: clipped gradient})."""
    sq = {i: v.flatten(1).square().sum(1) for i, v in g.items()}
    norms = torch.stack(list(sq.values())).sum(0).sqrt()
    c = torch.ones_like(norms) if max_norm is None else (max_norm / (norms + 1e-6)).clamp(max=1)
    agg = {i: (c.reshape(-1, *[1] * (v.dim() - 1)) * v).sum(0) for i, v in g.items()}
    if reduction == "mean":
        agg = {i: v / norms.shape[0] for i, v in agg.items()}
    return norms, {i: s.sqrt() for i, s in sq.items()}, agg


def weighted(reduction):
    """A loss mean (or sum) over dim 0 of each example's random signed weighting of outputs."""
    def loss(out, G):
        total = (out * G).sum()
        return total / out.shape[0] if reduction == "mean" else total
    return loss


def check(model, run, twin, x, aux, per_example_loss, reduction, max_norm, frozen=()):
    """Run `run(model)` in the block; compare norms, norms_by_param and .grad with the oracle."""
    g = oracle(twin, x, per_example_loss, aux, frozen)
    norms, by_index, agg = expected(g, reduction, max_norm)
    with mb.per_example(model, reduction=reduction, max_norm=max_norm) as pe:
        run(model)
    torch.testing.assert_close(pe.norms, norms, **TOL)
    names = [n for n, _ in model.named_parameters()]
    assert set(pe.norms_by_param) == {names[i] for i in by_index}
    for i, v in by_index.items():
        torch.testing.assert_close(pe.norms_by_param[names[i]], v, **TOL)
    for i, p in enumerate(model.parameters()):
        if i in agg:
            torch.testing.assert_close(p.grad, agg[i], **TOL)
        else:
            assert p.grad is None
    return pe


def data(lead, n_out=4):
    torch.manual_seed(5)
    x = torch.randn(6, *lead, SIZES[0], dtype=torch.float64)
    G = noncontiguous_randn((6, *lead, n_out))
    y = torch.randint(0, n_out, (6, *lead))
    return x, G, y


def ce_per_example(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["per_layer", "mlp_node"])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_outside_loss_matches_vmap_grad(name, path, bias, lead, reduction, max_norm):
    model = linear_stack(name, bias) if path == "per_layer" else mb.MLP(
        SIZES, activation=name, bias=bias, dtype=torch.float64)
    twin = twin_of(model)
    x, G, _ = data(lead)
    loss = weighted(reduction)
    check(model, lambda m: loss(m(x), G).backward(), twin, x, G,
          lambda out, G_n: (out * G_n).sum(), reduction, max_norm)


@pytest.mark.parametrize("name", sorted(TORCH_G))
@pytest.mark.parametrize("path", ["per_layer", "mlp_node", "mlp_loss", "backprop"])
def test_every_activation_on_every_path(name, path):
    model = linear_stack(name) if path == "per_layer" else mb.MLP(
        SIZES, activation=name, dtype=torch.float64)
    twin = twin_of(model)
    x, G, y = data((2,))
    if path in ("per_layer", "mlp_node"):
        run = lambda m: weighted("mean")(m(x), G).backward()  # noqa: E731
        check(model, run, twin, x, G, lambda out, G_n: (out * G_n).sum(), "mean", 0.5)
    else:
        run = (lambda m: m.loss(x, y)[0].backward()) if path == "mlp_loss" else (
            lambda m: m.backprop(x, y))
        check(model, run, twin, x, y, ce_per_example, "mean", 0.5)


@pytest.mark.parametrize("max_norm", [None, 0.2])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("path", ["mlp_loss", "backprop"])
def test_folded_loss_and_backprop_match_vmap_grad(path, lead, max_norm):
    model = mb.MLP(SIZES, activation="tanh", dtype=torch.float64)
    twin = twin_of(model)
    x, _, y = data(lead)
    run = (lambda m: m.loss(x, y)[0].backward()) if path == "mlp_loss" else (
        lambda m: m.backprop(x, y))
    check(model, run, twin, x, y, ce_per_example, "mean", max_norm)


@pytest.mark.parametrize("path", ["per_layer", "mlp_node", "backprop"])
def test_frozen_layer_is_neither_covered_nor_uncovered(path):
    model = linear_stack("tanh") if path == "per_layer" else mb.MLP(
        SIZES, activation="tanh", dtype=torch.float64)
    twin = twin_of(model)
    frozen = [p for p in model.parameters()][2:4]  # layer 2's W and b
    for p in frozen:
        p.requires_grad_(False)
    x, G, y = data(())
    if path == "backprop":
        check(model, lambda m: m.backprop(x, y), twin, x, y, ce_per_example, "mean", 0.4,
              frozen=(2, 3))
    else:
        check(model, lambda m: weighted("sum")(m(x), G).backward(), twin, x, G,
              lambda out, G_n: (out * G_n).sum(), "sum", 0.4, frozen=(2, 3))


def test_converted_model_with_other_parameters():
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 4)).double()
    model = mb.convert(copy.deepcopy(ref))
    with pytest.raises(ValueError, match=r"max_norm clips only .* not: 1\.weight, 1\.bias"):
        mb.per_example(model, max_norm=1.0)
    x, G, _ = data(())
    with mb.per_example(model) as pe:
        weighted("mean")(model(x), G).backward()
    assert pe.uncovered == ["1.weight", "1.bias"]
    g = oracle(ref, x, lambda out, G_n: (out * G_n).sum(), G)
    covered = {i: v for i, v in g.items() if i not in (2, 3)}
    norms, by_index, _ = expected(covered, "mean", None)
    torch.testing.assert_close(pe.norms, norms, **TOL)
    assert set(pe.norms_by_param) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    ref_model = copy.deepcopy(ref)  # .grad of every parameter is the plain backward's
    weighted("mean")(ref_model(x), G).backward()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


@pytest.mark.parametrize("lead, grads", [((2,), True), ((), True), ((), False)])
def test_reused_layer_and_grad_sample(lead, grads):
    # one mb.Linear applied twice: example n's gradient is the sum of both uses' shares (with
    # 2-D inputs and no grad_sample, the stacked rows must not serve it: not one share a call)
    torch.manual_seed(8)
    shared = mb.Linear(5, 5, activation="tanh", dtype=torch.float64)
    head = mb.Linear(5, 4, dtype=torch.float64)
    model = nn.ModuleDict({"shared": shared, "head": head})
    twin = nn.ModuleDict({"shared": nn.Linear(5, 5).double(), "head": nn.Linear(5, 4).double()})
    twin.load_state_dict(model.state_dict())

    def fwd(m, x):
        return m["head"](torch.tanh(m["shared"](torch.tanh(m["shared"](x))))) if m is twin \
            else m["head"](m["shared"](m["shared"](x)))

    x, G, _ = data(lead)
    params = {k: v.detach() for k, v in twin.named_parameters()}

    def _twin_call(t, ps, x_n):
        h = x_n.unsqueeze(0)
        for _ in range(2):
            h = torch.tanh(F.linear(h, ps["shared.weight"], ps["shared.bias"]))
        return F.linear(h, ps["head.weight"], ps["head.bias"])[0]

    g = vmap(grad(lambda ps, x_n, G_n: (_twin_call(twin, ps, x_n) * G_n).sum()),
             in_dims=(None, 0, 0))(params, x, G)
    sq = sum(v.flatten(1).square().sum(1) for v in g.values())
    with mb.per_example(model, reduction="sum", max_norm=0.7, grads=grads) as pe:
        (fwd(model, x) * G).sum().backward()
    torch.testing.assert_close(pe.norms, sq.sqrt(), **TOL)
    c = (0.7 / (sq.sqrt() + 1e-6)).clamp(max=1)
    for name, p in model.named_parameters():
        if grads:
            torch.testing.assert_close(p.grad_sample, g[name], **TOL)
        want = (c.reshape(-1, *[1] * (g[name].dim() - 1)) * g[name]).sum(0)
        torch.testing.assert_close(p.grad, want, **TOL)


class Attention(nn.Module):
    """q, k, v read one input (B, T, d), so they share its Gram; o, a wider GELU layer and its way
    back, and a 2-D head after a mean over T (benchmarks/per_example.py's block, small).
    linear(n_in, n_out, bias, activation): mb.Linear, or nn.Linear with the activation after."""

    def __init__(self, d, bias, linear):
        super().__init__()
        self.q, self.k, self.v, self.o = (linear(d, d, bias, "identity") for _ in range(4))
        self.up = linear(d, 3 * d, True, "gelu")
        self.down = linear(3 * d, d, bias, "identity")
        self.head = linear(d, 3, True, "identity")

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:])
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.o(att)
        x = x + self.down(self.up(x))
        return self.head(x.mean(-2))


def mb_linear(dtype):
    return lambda i, o, bias, act: mb.Linear(i, o, bias=bias, activation=act, dtype=dtype)


def nn_linear(i, o, bias, act):
    layer = nn.Linear(i, o, bias=bias, dtype=torch.float64)
    return layer if act == "identity" else nn.Sequential(layer, nn.GELU())


@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T, d", [(4, 12), (1, 6), (9, 6)], ids=["gram", "T1", "outer"])
def test_a_transformer_block_matches_vmap_grad(T, d, bias, max_norm):
    """(B, T, n) shares: q, k, v share their input's Gram (k's bias has gradient 0: its norm
    must be 0, not the root of a sum rounded below 0), beside the outer form, T = 1, a 2-D head."""
    torch.manual_seed(12)
    model = Attention(d, bias, mb_linear(torch.float64))
    twin = Attention(d, bias, nn_linear)
    twin.load_state_dict(_twin_state(model, twin))
    x, G = torch.randn(6, T, d, dtype=torch.float64), noncontiguous_randn((6, 3))
    check(model, lambda m: weighted("mean")(m(x), G).backward(), twin, x, G,
          lambda out, G_n: (out * G_n).sum(), "mean", max_norm)


def _twin_state(model, twin):
    """model's state dict under twin's names (twin's GELU layer is a Sequential)."""
    return dict(zip(twin.state_dict(), model.state_dict().values(), strict=True))


def test_gram_and_outer_forms_agree():
    from manualbp.per_example_norms import _sq_norm

    torch.manual_seed(9)
    for T, n_in, n_out in ((4, 3, 2), (2, 30, 20)):  # outer form, then Gram form
        D = torch.randn(3, T, n_out, dtype=torch.float64)
        A = torch.randn(3, T, n_in, dtype=torch.float64)
        want = torch.einsum("bto,bti->boi", D, A).square().sum((1, 2))
        torch.testing.assert_close(_sq_norm(D, A), want, **TOL)


def test_bad_arguments_are_refused():
    model = linear_stack("relu")
    with pytest.raises(ValueError, match=r"expected reduction in \('mean', 'sum'\).*got 'avg'"):
        mb.per_example(model, reduction="avg")
    with pytest.raises(ValueError, match=r"expected max_norm > 0 or None, got -1"):
        mb.per_example(model, max_norm=-1)
    with pytest.raises(TypeError, match="expected an nn.Module, got int"):
        mb.per_example(3)
    x = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected input with a batch dim.*got \(5,\)"):
        with mb.per_example(model):
            model(x)
    with pytest.raises(RuntimeError, match="ran no backward"):
        with mb.per_example(model):
            model(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="already open"):
        with mb.per_example(model), mb.per_example(model):
            pass
    with mb.per_example(model) as pe:  # a refused block leaves nothing open behind it
        model(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    assert pe.norms.shape == (3,)


def test_a_broken_clip_fails_the_oracle(monkeypatch):
    # clip after summing (scale the batch gradient by its own norm) instead of per example
    pe_module = sys.modules["manualbp.per_example"]  # mb.per_example is the function

    def clip_after_sum(shares, norms, max_norm, ddp):
        grads = [(p, D.reshape(-1, D.shape[-1]).t().mm(A.reshape(-1, A.shape[-1]))
                  if kind == "W" else D.reshape(-1, D.shape[-1]).sum(0))
                 for p, kind, D, A, _ in shares.values()]
        total = torch.stack([g.square().sum() for _, g in grads]).sum().sqrt() * norms.shape[0]
        c = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p, g in grads:
            pe_module._accumulate(p, g * c, ddp)

    model = mb.MLP(SIZES, activation="tanh", dtype=torch.float64)
    twin = twin_of(model)
    x, _, y = data(())
    check(copy.deepcopy(model), lambda m: m.backprop(x, y), twin, x, y, ce_per_example, "mean",
          0.2)  # the real clip passes
    monkeypatch.setattr(pe_module, "_clipped", clip_after_sum)
    with pytest.raises(AssertionError), native.paused():  # the Python finish: the C++ one is
        check(model, lambda m: m.backprop(x, y), twin, x, y, ce_per_example, "mean", 0.2)
    # held to it bit for bit (test_native_per_example), and to the oracle just above


@pytest.mark.parametrize("path", ["per_layer", "mlp_node", "backprop"])
def test_grad_sample_is_each_examples_gradient(path):
    model = linear_stack("tanh") if path == "per_layer" else mb.MLP(
        SIZES, activation="tanh", dtype=torch.float64)
    twin = twin_of(model)
    x, G, y = data((3,))
    if path == "backprop":
        g = oracle(twin, x, ce_per_example, y)
        run = lambda m: m.backprop(x, y)  # noqa: E731
    else:
        g = oracle(twin, x, lambda out, G_n: (out * G_n).sum(), G)
        run = lambda m: weighted("mean")(m(x), G).backward()  # noqa: E731
    with mb.per_example(model, grads=True):
        run(model)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.grad_sample, g[i], **TOL)
