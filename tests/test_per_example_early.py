"""A (B, T, n) share's part of the norm is formed in backward, while delta and a_prev are in
cache (per_example_norms.early; the C++ slots' early_share), not at the block's end.

On both backends: every single-call (B, T, n) share reaches the finish with its part (a W's
squared norm, a b's sum over T), a reused layer's shares without (its calls stack along T), and
the finish fed those parts gives the same bits as the finish forming them itself.
"""

import importlib

import pytest
import torch
from test_native import assert_equal
from test_native_per_example import in_block
from test_per_example import Attention, mb_linear

import manualbp as mb

pe_module = importlib.import_module("manualbp.per_example")


def spy_on_group(monkeypatch, strip=False):
    """[(id(param), kind, D.dim() or None where the call let D go, has pre)] of every share
    group() makes (strip: drop each pre and keep every D, so the finish forms every part
    itself, as before the parts moved into backward)."""
    seen, real = [], pe_module.group

    def group(calls, batch):
        shares = real(calls, batch)
        for key, (p, kind, D, A, pre) in list(shares.items()):
            seen.append((key, kind, None if D is None else D.dim(), pre is not None))
            if strip:
                shares[key] = (p, kind, D, A, None)
        return shares

    monkeypatch.setattr(pe_module, "group", group)
    if strip:  # the calls keep delta and a_prev, for the finish to form every part from them
        enter = pe_module.PerExample.__enter__

        def keeping(self):
            self._drop = False
            return enter(self)
        monkeypatch.setattr(pe_module.PerExample, "__enter__", keeping)
    return seen


def attention(dtype):
    torch.manual_seed(11)
    return Attention(12, True, mb_linear(dtype))  # T = 4: the Gram form, q, k, v on one input


def reused_stack(dtype):
    """Three mb.Linear on (B, T, n), the middle one called twice; a frozen first weight."""
    torch.manual_seed(9)
    first, middle, last = (mb.Linear(5, 6, activation="tanh", dtype=dtype),
                           mb.Linear(6, 6, activation="relu", dtype=dtype),
                           mb.Linear(6, 4, dtype=dtype))
    first.weight.requires_grad_(False)
    return torch.nn.Sequential(first, middle, middle, last), middle


def node(dtype):
    """An MLP node on (B, T, n): its (B T, n) rows are reshaped to (B, T, n) shares."""
    torch.manual_seed(5)
    return mb.MLP([5, 7, 4], activation="gelu", dtype=dtype)


def run_of(model, x, y, g, reduction):
    def run():
        out = model(x)
        loss = mb.softmax_cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                        reduction=reduction)
        (loss + (out * g).sum()).backward()
        return loss.detach()
    return run


def case(name, dtype):
    if name == "attention":
        model = attention(dtype)
        x, y = torch.randn(5, 4, 12, dtype=dtype), torch.randint(0, 3, (5,))
        g = torch.randn(3, 5, dtype=dtype).t()  # non-contiguous, signed
    elif name == "reused":
        model = reused_stack(dtype)[0]
        x, y = torch.randn(5, 3, 5, dtype=dtype), torch.randint(0, 4, (5, 3))
        g = torch.randn(4, 5, 3, dtype=dtype).movedim(0, -1)
    else:
        model = node(dtype)
        x, y = torch.randn(5, 3, 5, dtype=dtype), torch.randint(0, 4, (5, 3))
        g = torch.randn(4, 5, 3, dtype=dtype).movedim(0, -1)
    return model, x, y, g


@pytest.mark.parametrize("options", [{"max_norm": 0.05}, {}, {"grads": True}],
                         ids=["clip", "norms", "grads"])
@pytest.mark.parametrize("name", ["attention", "reused", "node"])
def test_each_single_call_share_arrives_with_its_part(name, options, monkeypatch):
    """... and, in a block of norms alone, without its delta and a_prev (let go in backward,
    as a plain backward frees them); the clip and per-example gradients still read them."""
    model, x, y, g = case(name, torch.float64)
    seen = spy_on_group(monkeypatch)
    in_block(model, run_of(model, x, y, g, "mean"), **options)
    assert seen, "the block's finish made no shares"
    reused = {id(model[1].weight), id(model[1].bias)} if name == "reused" else set()
    let_go = not options  # norms alone
    for key, kind, dim, has_pre in seen:
        if dim == 2:  # 2-D rows (the head): row norms, no part
            assert not has_pre, f"a 2-D {kind} share came with a part"
        elif key in reused:
            assert not has_pre, f"the reused layer's {kind} share came with one call's part"
            assert dim == 3, f"the reused layer's {kind} share came without its stacked delta"
        else:
            assert has_pre, f"a single-call (B, T, n) {kind} share came without its part"
            assert (dim is None) == let_go, f"a single-call {kind} share: D {dim}, {options}"
    assert any(dim != 2 for _, _, dim, _ in seen)


@pytest.mark.parametrize("name", ["reused", "attention"])
def test_a_layer_run_again_after_its_backward_is_refused_in_a_norms_block(name):
    """Its first call let its share go in backward, so the two cannot be stacked: one line that
    says so (a clip block keeps every share, and stacks them)."""
    model, x, y, g = case(name, torch.float64)
    with pytest.raises(RuntimeError, match="a layer ran again after its backward"):
        with mb.per_example(model):
            run_of(model, x, y, g, "mean")()
            model(x)
    with mb.per_example(model, max_norm=0.05) as pe:
        run_of(model, x, y, g, "mean")()
        run_of(model, x, y, g, "mean")()
    assert pe.norms.shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [
    {}, {"reduction": "sum"}, {"max_norm": 0.05}, {"max_norm": 1e3}, {"grads": True},
], ids=["norms", "norms-sum", "clip", "clip-loose", "grads"])
@pytest.mark.parametrize("name", ["attention", "reused", "node"])
def test_the_parts_from_backward_equal_the_finishs_own(name, options, dtype, monkeypatch):
    """Bit for bit: the finish fed the parts formed in backward, and the finish forming them."""
    model, x, y, g = case(name, dtype)
    run = run_of(model, x, y, g, options.get("reduction", "mean"))
    mine = in_block(model, run, **options)
    spy_on_group(monkeypatch, strip=True)
    ref = in_block(model, run, **options)
    for what, a, b in zip(("loss", "norms"), mine[:2], ref[:2], strict=True):
        assert_equal(a, b, what)
    for what, a, b in zip(("by param", "grad", "grad_sample"), mine[2:], ref[2:], strict=True):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_equal(a[key], b[key], f"{what}: {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_input_several_layers_read_is_reweighted_once(dtype):
    """The clip re-weights the narrower side of each (B, T, n) W share, and q, k, v's shared
    input once for all three (its width against their summed widths): o, down (narrower delta),
    up (narrower input) and q, k, v make 4 re-weightings of a (B, T, n) tensor, not 6."""
    from torch.profiler import ProfilerActivity, profile

    model, x, y, g = case("attention", dtype)
    pe = mb.per_example(model, max_norm=0.05).__enter__()
    run_of(model, x, y, g, "mean")()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        pe.__exit__(None, None, None)  # the block's end: the finish
    reweighted = [e for e in prof.events() if e.name == "aten::mul"
                  and len(e.input_shapes[0]) == 3 and e.input_shapes[1][1:] == [1, 1]]
    assert len(reweighted) == 4, [e.input_shapes for e in reweighted]
    assert pe.norms.shape == (5,)
