"""The usual calls' short ways to the C++ core: softmax_cross_entropy's checks told in C++
(native softmax_ce_plain) and MLP's forward and loss straight to the C++ node.

Each short way must serve exactly the calls the long way would hand the C++ core unchanged, with
the same bits, and decline everything else to the Python checks (which explain or flatten it).
"""

import pytest
import torch
from oracle import leaves, noncontiguous_randn

import manualbp as mb
from manualbp import native
from manualbp.loss_checks import plain_cross_entropy
from manualbp.rules import attach


@pytest.fixture(scope="module", autouse=True)
def built():
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")


@pytest.fixture
def plain_calls(monkeypatch):
    """What each call of native softmax_ce_plain gave: 'loss', 'declined' or 'raised'."""
    lib, seen = native.lib(), []
    real = lib.softmax_ce_plain

    def counted(*args):
        try:
            out = real(*args)
        except Exception:
            seen.append("raised")
            raise
        seen.append("declined" if out is None else "loss")
        return out

    monkeypatch.setattr(lib, "softmax_ce_plain", counted)
    return seen


def _cases():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 2, 1, 3, 1])
    nested = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)])
    return {  # name: (input, target, kwargs)
        "float64": (z, y, {}),
        "float32 sum": (z.float(), y, {"reduction": "sum"}),
        "none, strided logits": (torch.randn(4, 6).t(), y, {"reduction": "none"}),
        "ignore_index": (z, torch.tensor([0, 3, -100, 1, 3, 1]), {}),
        "ignore_index given": (z, y, {"ignore_index": 3}),
        "unbatched (C,)": (z[0], y[0], {}),
        "(N, C, d)": (torch.randn(3, 4, 2), torch.tensor([[0, 1], [2, 3], [1, 1]]), {}),
        "uint8 target": (z, y.to(torch.uint8), {}),
        "int32 target": (z, y.int(), {}),
        "float16 logits": (z.half(), y, {}),
        "probabilities": (z, torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1), {}),
        "weight": (z, y, {"weight": torch.rand(4, dtype=torch.float64)}),
        "smoothing": (z, y, {"label_smoothing": 0.1}),
        "int smoothing 0": (z, y, {"label_smoothing": 0}),
        "bad reduction": (z, y, {"reduction": "avg"}),
        "sparse logits": (z.to_sparse(), y, {}),
        "nested logits": (nested, y, {}),
        "list logits": (z.tolist(), y, {}),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_softmax_ce_plain_serves_what_plain_cross_entropy_accepts_and_no_more(case, plain_calls):
    input, target, kw = CASES[case]
    plain = plain_cross_entropy(input, target, kw.get("weight"), kw.get("reduction", "mean"),
                                kw.get("label_smoothing", 0.0))

    def run():
        zs, = leaves(input) if isinstance(input, torch.Tensor) and not input.is_sparse \
            and not input.is_nested else (input,)
        loss = mb.softmax_cross_entropy(zs, target, **kw)
        if isinstance(zs, torch.Tensor) and zs.requires_grad:
            torch.manual_seed(5)  # the same upstream gradient in both runs
            loss.backward(noncontiguous_randn(loss.shape, loss.dtype) if loss.dim() else None)
        return loss.detach(), getattr(zs, "grad", None)

    try:
        mine = run()
    except (TypeError, ValueError, RuntimeError) as error:
        mine = error
    fast = list(plain_calls)
    with native.paused():
        try:
            ref = run()
        except (TypeError, ValueError, RuntimeError) as error:
            ref = error
    assert plain_calls == fast, "the paused run called the C++ core"
    smoothing = kw.get("label_smoothing", 0.0)
    asked = kw.get("weight") is None and type(smoothing) is float and smoothing == 0.0
    assert fast == (["loss" if plain else "declined"] if asked else [])
    if isinstance(ref, Exception):
        assert type(mine) is type(ref) and str(mine) == str(ref)
        return
    for a, b in zip(mine, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("target, message", [
    (torch.tensor([0, 3, 7, 1]), r"class index 7 at target\[2\] \(flattened\) is out of range"),
    (torch.tensor([0, 3, 1]), r"expected class-index target of shape \(4,\)"),
])
def test_softmax_ce_plain_refusals_say_why_as_before(target, message, plain_calls):
    z = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        mb.softmax_cross_entropy(z, target)
    assert plain_calls[0] == "raised"  # the kernel refused; the checks then said why


NODE = "torch::autograd::CppNode<manualbp::MLPNode>"


def test_mlp_forward_and_loss_take_the_node_only_for_the_usual_call():
    """The C++ node serves plain eager calls (MLP._run's mlp_flat, then run_node); a Trace,
    autocast, another rule, a per_example block and torch.func take their own ways (checked by
    the node made)."""
    torch.manual_seed(3)
    mlp = mb.MLP([4, 5, 3])
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    assert mlp(x).grad_fn.name() == NODE
    assert mlp.loss(x, y)[0].grad_fn.name() == NODE
    assert mlp(x, trace=mb.Trace()).grad_fn.name().startswith("MLPFunction")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp(x).grad_fn.name().startswith("MLPFunction")
    fa = mb.MLP([4, 5, 3], rule="feedback_alignment")
    fa.load_state_dict(mlp.state_dict(), strict=False)
    assert fa(x).grad_fn.name() == NODE  # through run_node with its B
    with native.paused():
        ref_fa = fa(x)
    assert torch.equal(fa(x), ref_fa)
    with mb.per_example(mlp):
        out = mlp.loss(x, y)[0]
        assert out.grad_fn.name() == NODE  # run_node's per-example node
        out.backward()
    grads = torch.func.grad(lambda W: torch.func.functional_call(
        mlp, {"layers.0.weight": W}, (x,)).sum())(mlp.layers[0].weight.detach())
    assert grads.shape == (5, 4)


def test_mlp_short_way_refusal_still_names_the_layer():
    mlp = mb.MLP([4, 5, 3])
    with torch.no_grad():
        mlp.layers[1].weight = torch.nn.Parameter(torch.randn(3, 6))  # widths do not chain
    with pytest.raises(RuntimeError):
        mlp(torch.randn(2, 4))


def _runs(model):
    """The Linears and Identities, as run_chain takes them (a parametrized Linear, whose class
    parametrize swapped, kept in: Chain.forward cuts the run there, _flat refuses it too)."""
    return [m for m in model._modules.values() if isinstance(m, (mb.Linear, torch.nn.Identity))]


def _chain_cases():
    from test_chain import BAD_INPUTS, FALLBACKS, WIDTHS, stack

    cases = {}
    for change in FALLBACKS:
        model = mb.convert(stack(torch.nn.Tanh))
        change(model)
        x = torch.randn(4, WIDTHS[0], dtype=torch.float64)
        outer = change.__name__ == "_hooked_sequential"  # Chain.forward's to see, not _flat's
        cases[change.__name__.strip("_")] = (model, x, outer)
    for name, make in BAD_INPUTS:
        cases["input " + name] = (mb.convert(stack()), make(), False)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        cases[f"usual {dtype}"] = (mb.convert(stack(dtype=dtype)),
                                   torch.randn(4, WIDTHS[0], dtype=dtype), True)
    usual = mb.convert(stack())
    cases["no bias"] = (mb.convert(stack(bias=False)), torch.randn(4, 5, dtype=torch.float64),
                        True)
    cases["leading dims"] = (usual, torch.randn(2, 3, 5, dtype=torch.float64), True)
    cases["strided rows"] = (usual, torch.randn(5, 4, dtype=torch.float64).t(), True)
    cases["strided leading dims"] = (usual, torch.randn(3, 2, 5, dtype=torch.float64)
                                     .transpose(0, 1), False)
    cases["tensor subclass"] = (usual, torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64)),
                                False)
    cases["nested input"] = (usual, torch.nested.nested_tensor(
        [torch.randn(2, 5, dtype=torch.float64)]), False)
    frozen = mb.convert(stack())
    frozen[2].weight.requires_grad_(False)
    cases["frozen layer"] = (frozen, torch.randn(4, 5, dtype=torch.float64), True)
    shared = torch.nn.Linear(5, 5, dtype=torch.float64)
    cases["layer twice"] = (mb.convert(torch.nn.Sequential(shared, shared)),
                            torch.randn(4, 5, dtype=torch.float64), False)
    kp = mb.convert(stack())
    for layer in _runs(kp)[0::2]:
        attach(layer, "kolen_pollack")
    cases["kolen_pollack (the Python _flat's)"] = (kp, torch.randn(4, 5, dtype=torch.float64),
                                                   False)
    cases["one layer"] = (mb.convert(torch.nn.Sequential(torch.nn.Linear(5, 3))),
                          torch.randn(4, 5), False)
    return cases


@pytest.mark.parametrize("case", sorted(_chain_cases()))
def test_chain_flat_in_cpp_confirms_only_what_the_python_flat_serves(case):
    """native chain_flat gives the Python _flat's answer where it serves, and None elsewhere
    (the Python _flat then decides); it serves every usual run."""
    from manualbp.chain import _flat

    model, x, usual = _chain_cases()[case]
    run = _runs(model)
    mine, ref = native.lib().chain_flat(run, x, torch.nn.Identity), _flat(run, x)
    if mine is not None:
        assert ref is not None and len(mine) == len(ref) == 4
        assert mine[1] == ref[1] and mine[3] == ref[3]
        for got, want in ((mine[0], ref[0]), (mine[2], ref[2])):
            assert type(got) is type(want) and len(got) == len(want)
            assert all(a is b for a, b in zip(got, want, strict=True))
    assert (mine is not None) == usual


def _mlp_cases():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)

    def net(dtype=torch.float64, bias=True, change=None):
        mlp = mb.MLP([5, 6, 3], bias=bias, dtype=dtype)
        if change is not None:
            change(mlp)
        return mlp

    def plain_weight(mlp):
        W = mlp.layers[1].weight.detach().clone().requires_grad_()
        del mlp.layers[1].weight
        mlp.layers[1].weight = W

    def broadcast_bias(mlp):
        mlp.layers[0].bias = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    cases = {f"usual {d}": (net(d), x.to(d), True)
             for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
    cases.update({
        "no bias": (net(bias=False), x, True),
        "leading dims": (net(), torch.randn(2, 3, 5, dtype=torch.float64), True),
        "strided input": (net(), torch.randn(5, 4, dtype=torch.float64).t(), True),
        "tensor subclass input": (net(), torch.nn.Parameter(x.clone()), True),
        "backward hook (MLP refuses it)": (net(change=lambda m: m.layers[1]
                                             .register_full_backward_hook(
                                                 lambda *a: None)), x, False),
        "forward hook": (net(change=lambda m: m.layers[1].register_forward_hook(
            lambda *a: None)), x, False),
        "forward pre-hook": (net(change=lambda m: m.layers[0].register_forward_pre_hook(
            lambda *a: None)), x, False),
        "parametrized": (net(change=lambda m: torch.nn.utils.parametrizations.weight_norm(
            m.layers[1])), x, False),
        "plain tensor weight": (net(change=plain_weight), x, False),
        "broadcast bias": (net(change=broadcast_bias), x, False),
        "input dtype": (net(), x.float(), False),
        "input width": (net(), torch.randn(4, 6, dtype=torch.float64), False),
        "0-dim input": (net(), torch.tensor(1.0, dtype=torch.float64), False),
        "integer input": (net(), torch.ones(4, 5, dtype=torch.int64), False),
        "complex input": (net(), torch.randn(4, 5, dtype=torch.complex128), False),
        "sparse input": (net(), x.to_sparse(), False),
        "list input": (net(), x.tolist(), False),
    })
    return cases


@pytest.mark.parametrize("case", sorted(_mlp_cases()))
def test_mlp_flat_in_cpp_confirms_only_what_the_python_checks_pass(case):
    """native mlp_flat gives MLP._flat's answer where _flat and check_linear_args pass the call
    as the usual one, and None elsewhere (the Python then decides, and explains)."""
    from manualbp.linear import check_linear_args

    mlp, x, usual = _mlp_cases()[case]
    mine = native.lib().mlp_flat(mlp._modules["layers"]._modules, x)
    try:
        ref = mlp._flat()
        check_linear_args("MLP", x, ref[0][0], ref[0][1])
    except (TypeError, ValueError):
        ref = None
    if mine is not None:
        assert ref is not None and mine[1] == ref[1] and type(mine[1]) is tuple
        assert type(mine[0]) is list and len(mine[0]) == len(ref[0])
        assert all(a is b for a, b in zip(mine[0], ref[0], strict=True))
    assert (mine is not None) == usual
