"""Learning rules on every path, against plain autograd built to send the error through B.

The reference is a straight-through construction in float64: z = a_prev.detach() W^T + b +
(a_prev B^T - (a_prev B^T).detach()) has backprop's value, gives a_prev the gradient delta B and
W (and B, which is Kolen-Pollack's update) delta^T a_prev. DFA's: every layer's input is
detached and each hidden a[i] reaches z[L] through a zero-valued term a[i] D[i]^T, so
dL/da[i] = delta[L] D[i]. Upstream gradients are random, signed and non-contiguous.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from torch import nn

import manualbp as mb
from manualbp.rules import redraw, sign_feedback, sign_scale

RULES = ["feedback_alignment", "sign_symmetry", "kolen_pollack"]  # per layer
MLP_RULES = [*RULES, "direct_feedback_alignment"]
ACTS = ["tanh", "relu", "gelu"]  # g' from a (lean eager Functions) and from z


def st_linear(a_prev, W, b, B):
    """Backprop's value, error sent down through B; W and B both receive delta^T a_prev."""
    if B is None:
        return F.linear(a_prev, W, b)
    down = F.linear(a_prev, B)
    return F.linear(a_prev.detach(), W, b) + down - down.detach()


def g(name, z):
    return z if name == "identity" else mb.ACTIVATIONS[name].g(z)


def ss_B(layer, W):
    """Sign symmetry's B: sign of the current W, magnitude fixed in the buffer."""
    return W.detach().sign() * layer.feedback.abs().amax()


def layer_B(rule, layer, W, params):
    if rule == "sign_symmetry":
        return ss_B(layer, W)
    if rule == "kolen_pollack":
        return params["feedback"]
    return getattr(layer, "feedback", None)


def reference_mlp(mlp, x, rule):
    """(logits, leaves) of the float64 reference, with leaves named like mlp's parameters."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in mlp.named_parameters()}
    a, hidden = x, []
    for i, layer in enumerate(mlp.layers):
        mine = {k.split(".")[-1]: v for k, v in leaves.items() if k.startswith(f"layers.{i}.")}
        W, b = mine["weight"], mine.get("bias")
        if rule == "direct_feedback_alignment":
            a = g(layer.activation, F.linear(a if i == 0 else a.detach(), W, b))
        else:
            a = g(layer.activation, st_linear(a, W, b, layer_B(rule, layer, W, mine)))
        hidden.append(a)
    if rule == "direct_feedback_alignment":
        for h, layer in zip(hidden[:-1], mlp.layers[:-1], strict=True):
            up = F.linear(h, layer.feedback)  # (m, n_L), value 0 below
            a = a + up - up.detach()
    return a, leaves


def check_mlp_grads(mlp, rule, run, lead=(2, 3)):
    """run(mlp, x, g) leaves .grad on mlp's parameters and x; compare with the reference."""
    x = torch.randn(*lead, mlp.sizes[0], dtype=torch.float64)
    up = noncontiguous_randn((*lead, mlp.sizes[-1]))
    x_mine = x.clone().requires_grad_()
    mlp.zero_grad(set_to_none=True)
    run(mlp, x_mine, up)
    ref, leaves = reference_mlp(mlp, x_ref := x.clone().requires_grad_(), rule)
    names = list(leaves)
    grads = torch.autograd.grad(ref, [*leaves.values(), x_ref], up)
    mine = dict(mlp.named_parameters())
    for name, want in zip(names, grads, strict=False):
        torch.testing.assert_close(mine[name].grad, want, msg=f"{rule}: {name}")
    torch.testing.assert_close(x_mine.grad, grads[-1], msg=f"{rule}: dL/dx")
    return x_mine.grad


def run_eager(mlp, x, up):
    mlp(x).backward(up)


def run_general(mlp, x, up):  # a Trace sends the call through MLPFunction
    mlp(x, trace=mb.Trace()).backward(up)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("path", [run_eager, run_general], ids=["eager", "general"])
@pytest.mark.parametrize("rule", MLP_RULES)
def test_mlp_node_gradients_equal_the_reference(rule, path, act):
    torch.manual_seed(0)
    mlp = mb.MLP([5, 7, 6, 4], activation=act, dtype=torch.float64, rule=rule)
    check_mlp_grads(mlp, rule, path)


@pytest.mark.parametrize("rule", MLP_RULES)
def test_folded_loss_and_backprop_give_the_reference_gradients(rule):
    torch.manual_seed(1)
    mlp = mb.MLP([5, 7, 6, 4], activation="tanh", dtype=torch.float64, rule=rule)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    scale = torch.randn((), dtype=torch.float64)  # a signed upstream gradient of the loss
    ref, leaves = reference_mlp(mlp, x, rule)
    want = torch.autograd.grad(F.cross_entropy(ref, y) * scale, list(leaves.values()),
                               retain_graph=True)
    mlp.zero_grad(set_to_none=True)
    (mlp.loss(x, y)[0] * scale).backward()
    for (name, p), w in zip(mlp.named_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, msg=f"loss(): {name}")
    want = torch.autograd.grad(F.cross_entropy(ref, y), list(leaves.values()))
    mlp.backprop(x, y, accumulate=False)
    for (name, p), w in zip(mlp.named_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, msg=f"backprop(): {name}")
    if rule == "kolen_pollack":  # B's .grad is its own tensor, not W's
        layer = mlp.layers[0]
        assert layer.feedback.grad.data_ptr() != layer.weight.grad.data_ptr()


def per_layer_reference(rule, layer, x, up, act):
    W = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    B = layer.feedback.detach().clone().requires_grad_() if rule == "kolen_pollack" else (
        ss_B(layer, W) if rule == "sign_symmetry" else layer.feedback)
    x = x.detach().clone().requires_grad_()
    inputs = [x, W, b] + ([B] if rule == "kolen_pollack" else [])
    return torch.autograd.grad(g(act, st_linear(x, W, b, B)), inputs, up)


@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rule", RULES)
def test_linear_and_convert_gradients_equal_the_reference(rule, act, lead):
    torch.manual_seed(2)
    layer = mb.Linear(5, 4, activation=act, dtype=torch.float64, rule=rule)
    plain = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64), nn.Identity())
    mb.convert(plain, rule=rule)  # the same layer kind, reached through convert
    for lin in (layer, plain[0]):
        lin.activation = act
        x = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
        up = noncontiguous_randn((*lead, 4))
        want = per_layer_reference(rule, lin, x, up, act)
        lin(x).backward(up)
        mine = [x.grad, lin.weight.grad, lin.bias.grad]
        mine += [lin.feedback.grad] if rule == "kolen_pollack" else []
        for m, w, name in zip(mine, want, ["x", "W", "b", "B"], strict=False):
            torch.testing.assert_close(m, w, msg=f"{rule} {act}: {name}")


@pytest.mark.parametrize("fn", [mb.LinearActFunction, mb.LinearActEagerFunction])
def test_both_linear_functions_take_the_feedback_matrix(fn):
    torch.manual_seed(3)
    x, W, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
               for s in [(3, 5), (4, 5), (4,)])
    B = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # Kolen-Pollack style
    up = noncontiguous_randn((3, 4))
    fn.apply(x, W, b, "relu", B).backward(up)
    want = torch.autograd.grad(torch.relu(st_linear(x, W, b, B)), [x, W, b, B], up)
    for m, w in zip([x.grad, W.grad, b.grad, B.grad], want, strict=True):
        torch.testing.assert_close(m, w)
    x.grad = None
    mb.linear_act(x, W, b, "relu", feedback=B.detach()).backward(up)
    torch.testing.assert_close(x.grad, want[0])


def test_no_rule_falls_back_to_backprop():
    """Each rule's dL/dx (per layer and fused) and first-layer gradient differ from backprop's."""
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    up = noncontiguous_randn((6, 4))
    results = {}
    for rule in ["backprop", *MLP_RULES]:
        torch.manual_seed(4)
        mlp = mb.MLP([5, 7, 6, 4], activation="tanh", dtype=torch.float64, rule=rule)
        xs = x.clone().requires_grad_()
        mlp(xs).backward(up)
        mlp.backprop(x, y, accumulate=False)
        grad_W1 = mlp.layers[0].weight.grad.clone()
        torch.manual_seed(4)
        layer = mb.Linear(5, 4, dtype=torch.float64,
                          rule=rule if rule in RULES else "backprop")
        xl = x.clone().requires_grad_()
        layer(xl).backward(up)
        results[rule] = (xs.grad, grad_W1, xl.grad)
    for rule in MLP_RULES:
        fused, grad_W1, per_layer = results[rule]
        assert not torch.allclose(fused, results["backprop"][0]), rule
        assert not torch.allclose(grad_W1, results["backprop"][1]), rule
        if rule in RULES:
            assert not torch.allclose(per_layer, results["backprop"][2]), rule


def test_dfa_changing_one_layers_D_changes_only_that_layers_delta():
    torch.manual_seed(5)
    mlp = mb.MLP([5, 6, 7, 8, 3], activation="relu", dtype=torch.float64, rule="dfa")
    x, up = torch.randn(9, 5, dtype=torch.float64), noncontiguous_randn((9, 3))

    def deltas():
        trace = mb.Trace()
        mlp(x, trace=trace).backward(up)
        return trace.delta

    before = deltas()
    with torch.no_grad():
        mlp.layers[1].feedback.normal_()
    after = deltas()
    for i, (d0, d1) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(d0, d1) != (i == 1), f"layer {i}"


def test_trace_holds_backprops_delta_from_the_same_pass():
    torch.manual_seed(6)
    x, up = torch.randn(4, 5, dtype=torch.float64), noncontiguous_randn((4, 3))
    fa = mb.MLP([5, 6, 7, 3], activation="tanh", dtype=torch.float64, rule="fa")
    bp = mb.MLP([5, 6, 7, 3], activation="tanh", dtype=torch.float64)
    bp.load_state_dict(fa.state_dict(), strict=False)  # same W, b
    t_fa, t_bp = mb.Trace(), mb.Trace()
    fa(x, trace=t_fa).backward(up)
    bp(x, trace=t_bp).backward(up)
    for mine, want in zip(t_fa.delta_backprop, t_bp.delta, strict=True):
        torch.testing.assert_close(mine, want)
    assert not torch.allclose(t_fa.delta[0], t_bp.delta[0])


def test_kolen_pollack_brings_B_into_line_with_W():
    torch.manual_seed(7)
    mlp = mb.MLP([4, 16, 3], activation="tanh", rule="kp")
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def angle(layer):
        return torch.nn.functional.cosine_similarity(
            layer.weight.detach().flatten(), layer.feedback.detach().flatten(), dim=0).item()

    start = [angle(layer) for layer in mlp.layers]
    for _ in range(200):
        mlp.backprop(x, y, accumulate=False)
        opt.step()
    end = [angle(layer) for layer in mlp.layers]
    for c0, c1 in zip(start, end, strict=True):
        assert c1 > 0.9 and c1 > c0 + 0.5, (start, end)


def test_feedback_is_a_seeded_saved_moved_tensor():
    for rule in MLP_RULES:
        torch.manual_seed(8)
        mlp = mb.MLP([5, 7, 6, 4], rule=rule)
        torch.manual_seed(8)
        bp = mb.MLP([5, 7, 6, 4])
        mine = dict(mlp.named_parameters())
        for name, p in bp.named_parameters():
            assert torch.equal(mine[name], p), rule  # a rule draws after the weights: same W, b
        keys = [k for k in mlp.state_dict() if k.endswith("feedback")]
        expected = 2 if rule == "direct_feedback_alignment" else 3
        assert len(keys) == expected, (rule, keys)
        if rule == "direct_feedback_alignment":
            assert mlp.layers[0].feedback.shape == (4, 7)  # (n_L, n_i)
        else:
            assert mlp.layers[0].feedback.shape == mlp.layers[0].weight.shape
        torch.manual_seed(8)
        again = mb.MLP([5, 7, 6, 4], rule=rule)
        assert torch.equal(again.layers[0].feedback, mlp.layers[0].feedback)
        mlp.double()
        assert mlp.layers[0].feedback.dtype == torch.float64
    kp = mb.Linear(3, 2, rule="kp")
    assert isinstance(kp.feedback, nn.Parameter) and "feedback" in dict(kp.named_parameters())
    fa = mb.Linear(3, 2, rule="fa")
    assert "feedback" in dict(fa.named_buffers()) and len(list(fa.parameters())) == 2


def test_sign_symmetry_follows_Ws_sign_with_the_magnitude_it_started_with():
    layer = mb.Linear(4, 3, rule="sign_symmetry")
    s = layer.weight.detach().square().mean().sqrt()
    torch.testing.assert_close(layer.feedback, layer.weight.detach().sign() * s)
    with torch.no_grad():
        layer.weight.mul_(-3)
    layer(torch.randn(2, 4))
    torch.testing.assert_close(layer.feedback, layer.weight.detach().sign() * s)
    with torch.no_grad():
        layer.weight.normal_()
    redraw(layer, "he")  # a new init takes a new magnitude
    s = layer.weight.detach().square().mean().sqrt()
    torch.testing.assert_close(layer.feedback, layer.weight.detach().sign() * s)
    with torch.no_grad():  # exact zeros of either sign send +-s by their sign bit
        layer.weight[0, :2] = torch.tensor([0.0, -0.0])
    want = sign_feedback(layer.weight, sign_scale(layer.feedback))
    layer(torch.randn(2, 4))  # the forward's B, copysign(feedback, W): the same bits
    assert torch.equal(layer.feedback, want) and torch.equal(layer.feedback.abs(), s.expand(3, 4))
    assert layer.feedback[0, 0] > 0 > layer.feedback[0, 1]


def test_rules_under_autocast_match_the_reference_in_bf16_tolerance():
    for rule in MLP_RULES:
        torch.manual_seed(9)
        mlp = mb.MLP([5, 7, 6, 4], activation="tanh", rule=rule)
        x, up = torch.randn(6, 5), torch.randn(6, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(x)
        assert out.dtype == torch.bfloat16
        out.float().backward(up)
        mine = {n: p.grad.clone() for n, p in mlp.named_parameters()}
        ref, leaves = reference_mlp(mlp.double(), x.double(), rule)
        want = torch.autograd.grad(ref, list(leaves.values()), up.double())
        for (name, m), w in zip(mine.items(), want, strict=True):
            torch.testing.assert_close(m.double(), w, rtol=0.05, atol=0.02, msg=f"{rule} {name}")


@pytest.mark.slow
def test_rules_compile_fullgraph_and_functorch():
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    for rule in MLP_RULES:
        torch.manual_seed(10)
        mlp = mb.MLP([5, 7, 4], activation="relu", dtype=torch.float64, rule=rule)
        eager = mlp.loss(x, y)[0]
        want = torch.autograd.grad(eager, list(mlp.parameters()))
        compiled = torch.compile(lambda x, y, mlp=mlp: mlp.loss(x, y)[0], fullgraph=True,
                                 backend="eager")
        got = torch.autograd.grad(compiled(x, y), list(mlp.parameters()))
        for w, m in zip(want, got, strict=True):
            torch.testing.assert_close(m, w, msg=rule)
        params = dict(mlp.named_parameters())
        buffers = dict(mlp.named_buffers())
        def f(p, mlp=mlp, buffers=buffers):
            return torch.func.functional_call(mlp, (p, buffers), (x,), {}).logsumexp(1).mul(
                y.double()).sum()

        fgrad = torch.func.grad(f)
        mine = fgrad(params)
        ref = torch.autograd.grad(mlp(x).logsumexp(1).mul(y.double()).sum(), list(params.values()))
        for (name, m), w in zip(mine.items(), ref, strict=True):
            torch.testing.assert_close(m, w, msg=f"{rule} torch.func {name}")
    layer = mb.Linear(5, 4, activation="tanh", dtype=torch.float64, rule="kp")
    f = torch.compile(layer, fullgraph=True, backend="eager")
    up = noncontiguous_randn((6, 4))
    f(x).backward(up)
    got = [layer.weight.grad.clone(), layer.feedback.grad.clone()]
    layer.zero_grad()
    layer(x).backward(up)
    torch.testing.assert_close(got[0], layer.weight.grad)
    torch.testing.assert_close(got[1], layer.feedback.grad)


@pytest.mark.parametrize("build, pattern", [
    (lambda: mb.Linear(3, 2, rule="hebbian"), "Linear: unknown rule 'hebbian'; expected one of"),
    (lambda: mb.MLP([3, 2], rule=3), "MLP: unknown rule 3"),
    (lambda: mb.convert(nn.Linear(3, 2), rule="fx"), "convert: unknown rule 'fx'"),
    (lambda: mb.Linear(3, 2, rule="dfa"), "Linear: rule 'direct_feedback_alignment' .* use mb.MLP"),
    (lambda: mb.convert(nn.Linear(3, 2), rule="dfa"), "convert: rule 'direct_feedback_alignment'"),
    (lambda: mb.MLP([3, 4, 2], rule="dfa").layers[0](torch.randn(1, 3)),
     "Linear: this layer belongs to an MLP trained by direct feedback alignment"),
    (lambda: mb.linear_act(torch.randn(2, 3), torch.randn(4, 3), feedback=torch.randn(3, 4)),
     r"linear_act: expected feedback shaped like the weight \(4, 3\)"),
    (lambda: mb.linear_act(torch.randn(2, 3), torch.randn(4, 3), feedback=[1.0]),
     "linear_act: expected feedback to be a torch.Tensor, got list"),
])
def test_bad_rules_are_refused_with_a_clear_message(build, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        build()


@pytest.mark.parametrize("rule", RULES)
def test_per_layer_rules_under_autocast(rule):
    torch.manual_seed(11)
    layer = mb.Linear(5, 4, activation="tanh", rule=rule)
    x = torch.randn(6, 5, requires_grad=True)
    up = torch.randn(6, 4)
    want = per_layer_reference(rule, layer.double(), x.double(), up.double(), "tanh")
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().backward(up)
    mine = [x.grad, layer.weight.grad, layer.bias.grad]
    mine += [layer.feedback.grad] if rule == "kolen_pollack" else []
    for m, w in zip(mine, want, strict=True):
        assert m.dtype == torch.float32  # each gradient in its parameter's dtype
        torch.testing.assert_close(m.double(), w, rtol=0.05, atol=0.02, msg=rule)
