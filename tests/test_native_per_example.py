"""MLP.backprop's C++ step inside mb.per_example against the Python pass: bit for bit.

The C++ pass hands each covered layer's (delta, a_prev) to the block's probe, as layer_grads does
in Python, and leaves a clipped layer's grad_W, grad_b to the block. Norms, norms by parameter,
per-example gradients and every .grad must be torch.equal to the Python pass's (native paused),
and the Python pass must not run when the C++ core is there. tests/test_per_example.py checks
both backends against torch.func's vmap(grad) in float64.
"""

import pytest
import torch
from test_native import assert_equal
from test_per_example import Attention, mb_linear

import manualbp as mb
from manualbp import native


@pytest.fixture(scope="module", autouse=True)
def built():
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")


def in_block(model, run, **options):
    """run() in a block on top of a prior .grad; (loss, norms, by param, grads, samples)."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    with mb.per_example(model, **options) as pe:
        loss = run()
    samples = {n: p.grad_sample for n, p in model.named_parameters() if hasattr(p, "grad_sample")}
    for p in model.parameters():
        p.__dict__.pop("grad_sample", None)
    return (loss, pe.norms, pe.norms_by_param,
            {n: p.grad for n, p in model.named_parameters()}, samples)


def assert_same(mine, ref):
    """in_block's results, native against Python, bit for bit (None where either is None)."""
    for what, a, b in zip(("loss", "norms"), mine[:2], ref[:2], strict=True):
        assert_equal(a.detach(), b.detach(), what)
    for what, a, b in zip(("by param", "grad", "grad_sample"), mine[2:], ref[2:], strict=True):
        assert a.keys() == b.keys(), what
        for key in a:
            if a[key] is None or b[key] is None:
                assert a[key] is b[key] is None, f"{what}: {key}"
            else:
                assert_equal(a[key], b[key], f"{what}: {key}")


def both(model, run, **options):
    """in_block natively, then with the C++ core paused (the Python reference)."""
    mine = in_block(model, run, **options)
    with native.paused():
        return mine, in_block(model, run, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("options", [
    {}, {"reduction": "sum"}, {"max_norm": 0.05}, {"max_norm": 0.05, "reduction": "sum"},
    {"max_norm": 1e3}, {"grads": True},
], ids=["norms", "norms-sum", "clip", "clip-sum", "clip-loose", "grads"])
@pytest.mark.parametrize("rule", ["backprop", "feedback_alignment", "direct_feedback_alignment"])
def test_backprop_in_a_block_is_bit_identical(rule, options, accumulate, bias, lead, dtype):
    torch.manual_seed(7)
    mlp = mb.MLP([5, 8, 6, 4], activation="tanh", bias=bias, dtype=dtype, rule=rule)
    mlp.layers[1].weight.requires_grad_(False)  # a frozen weight beside a covered bias
    x, y = torch.randn(6, *lead, 5, dtype=dtype), torch.randint(0, 4, (6, *lead))
    assert_same(*both(mlp, lambda: mlp.backprop(x, y, accumulate=accumulate), **options))


def test_backprop_in_a_block_never_runs_the_python_pass(monkeypatch):
    torch.manual_seed(0)
    mlp = mb.MLP([4, 6, 3], dtype=torch.float64)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])

    def python_pass(*args, **kwargs):
        raise AssertionError("MLP.backprop ran the Python pass though the C++ core is built")

    monkeypatch.setattr(mb.MLP, "_backprop", python_pass)
    with mb.per_example(mlp, max_norm=1.0) as pe:
        mlp.backprop(x, y)
    assert pe.norms.shape == (5,) and all(p.grad is not None for p in mlp.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("options", [
    {}, {"max_norm": 0.05}, {"max_norm": 0.05, "reduction": "sum"}, {"grads": True},
], ids=["norms", "clip", "clip-sum", "grads"])
@pytest.mark.parametrize("act", ["tanh", "gelu"])  # g' from a, g' from z
@pytest.mark.parametrize("path", ["node", "per_layer"])
def test_autograd_paths_in_a_block_are_bit_identical(path, act, options, lead, dtype):
    """The C++ nodes fill the block's slots with each layer's (delta, a_prev): the same norms,
    clipped gradients and per-example gradients as the Python Functions' probes."""
    torch.manual_seed(8)
    if path == "node":
        model = mb.MLP([5, 8, 6, 4], activation=act, dtype=dtype)
        name = "MLPNode"
    else:
        model = torch.nn.Sequential(mb.Linear(5, 8, activation=act, dtype=dtype),
                                    mb.Linear(8, 6, activation=act, dtype=dtype),
                                    mb.Linear(6, 4, bias=False, dtype=dtype))
        name = "LinearActNode"
    list(model.parameters())[2].requires_grad_(False)  # a frozen weight beside a covered bias
    x, y = torch.randn(6, *lead, 5, dtype=dtype), torch.randint(0, 4, (6, *lead))
    g = torch.randn(4, 6, *lead, dtype=dtype).movedim(0, -1)  # non-contiguous, signed
    with mb.per_example(model):
        out = model(x)
        assert name in out.grad_fn.name(), "the block's forward did not run the C++ node"
        out.sum().backward()

    def run():  # the loss and a random signed non-contiguous upstream gradient on the output
        out = model(x)
        loss = mb.softmax_cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                        reduction=options.get("reduction", "mean"))
        (loss + (out * g).sum()).backward()
        return loss

    assert_same(*both(model, run, **options))


def test_a_native_slot_is_closed_when_the_block_ends():
    """The slots a block opened are taken when it exits, even with no backward inside (the block
    then raises) or an exception: a backward after the block fills none, so nothing is kept."""
    mlp = mb.MLP([4, 6, 3], dtype=torch.float64)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    lib = native.load()
    with pytest.raises(RuntimeError, match="ran no backward"), mb.per_example(mlp) as pe:
        loss = mlp.loss(x, y)[0]
        slots = [id(c) for c in pe._calls]
    with pytest.raises(KeyError), mb.per_example(mlp) as pe:
        out = mlp(x)
        slots += [id(c) for c in pe._calls]
        raise KeyError("the user's code fails inside the block")
    assert len(slots) == 4
    loss.backward()
    out.sum().backward()  # both after their blocks
    assert all(lib.take_slot(slot) == ([None] * 4, False) for slot in slots)


def stack_of_linears(dtype, bias, reused=False):
    """Three mb.Linear layers (the per-layer path); reused: the middle one is called twice."""
    torch.manual_seed(9)
    first, middle, last = (mb.Linear(5, 6, activation="tanh", bias=bias, dtype=dtype),
                           mb.Linear(6, 6, activation="relu", bias=bias, dtype=dtype),
                           mb.Linear(6, 4, bias=bias, dtype=dtype))
    body = [first, middle, middle, last] if reused else [first, middle, last]
    return torch.nn.Sequential(*body)


@pytest.fixture
def finishes(monkeypatch):
    """The name of every native finish (finish_rows, finish_shares) the blocks call, with its
    arguments (a spy on the module)."""
    lib, calls = native.load(), []

    class Spy:  # the extension module's attributes are read-only: stand in for it
        def __getattr__(self, name):
            return getattr(lib, name)

        def finish_rows(self, *args):
            calls.append(("finish_rows", args))
            return lib.finish_rows(*args)

        def finish_shares(self, *args):
            calls.append(("finish_shares", args))
            return lib.finish_shares(*args)

    real_lib = native.lib
    monkeypatch.setattr(native, "lib", lambda: None if real_lib() is None else Spy())
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path, options", [
    (path, options) for path in ("per_layer", "node", "backprop") for options in (
        {}, {"reduction": "sum"}, {"max_norm": 0.05}, {"max_norm": 0.05, "reduction": "sum"},
        {"max_norm": 1e3}) if path != "backprop" or "reduction" not in options  # a mean loss
])
def test_the_cpp_finish_is_bit_identical_to_the_python_finish(path, options, bias, dtype,
                                                              finishes):
    """2-D shares, every layer with W and all or none a bias: native.finish_rows ends the block,
    with the Python finish's norms, norms by parameter and .grad bits."""
    if path == "per_layer":
        model = stack_of_linears(dtype, bias)
    else:
        torch.manual_seed(9)
        model = mb.MLP([5, 6, 6, 4], activation="tanh", bias=bias, dtype=dtype)
    x, y = torch.randn(7, 5, dtype=dtype), torch.randint(0, 4, (7,))
    reduction = options.get("reduction", "mean")

    def run():
        if path == "backprop":
            return model.backprop(x, y)
        loss = mb.softmax_cross_entropy(model(x), y, reduction=reduction)
        loss.backward()
        return loss.detach()

    assert_same(*both(model, run, **options))
    assert [name for name, _ in finishes] == ["finish_rows"]  # the paused block: Python's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["reused", "frozen", "lead", "mixed-bias"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_other_blocks_end_in_the_cpp_finish_of_shares(case, max_norm, dtype, finishes):
    """A reused layer, a frozen weight, (B, T, n) shares or a mix of layers with and without a
    bias: native.finish_shares, bit for bit the Python finish (sq_norms, clipped)."""
    model = stack_of_linears(dtype, True, reused=case == "reused")
    if case == "frozen":
        model[1].weight.requires_grad_(False)
    if case == "mixed-bias":
        model[2].bias = None
    lead = (3,) if case == "lead" else ()
    x, y = torch.randn(7, *lead, 5, dtype=dtype), torch.randint(0, 4, (7, *lead))

    def run():
        out = model(x)
        loss = mb.softmax_cross_entropy(out.reshape(-1, 4), y.reshape(-1))
        loss.backward()
        return loss.detach()

    assert_same(*both(model, run, max_norm=max_norm))
    assert [name for name, _ in finishes] == ["finish_shares"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T, d", [(4, 12), (1, 6), (9, 6)], ids=["gram", "T1", "outer"])
@pytest.mark.parametrize("options", [
    {}, {"reduction": "sum"}, {"max_norm": 0.05}, {"max_norm": 1e3}, {"grads": True},
], ids=["norms", "norms-sum", "clip", "clip-loose", "grads"])
def test_a_transformer_block_is_bit_identical(options, T, d, bias, dtype, finishes):
    """(B, T, n) shares in the Gram form (q, k, v reading one input), the outer form or T = 1,
    beside a 2-D head: finish_shares (grads=True: the Python finish on both)."""
    torch.manual_seed(11)
    model = Attention(d, bias, mb_linear(dtype))
    x, y = torch.randn(5, T, d, dtype=dtype), torch.randint(0, 3, (5,))
    g = torch.randn(3, 5, dtype=dtype).t()  # non-contiguous, signed

    def run():
        out = model(x)
        loss = mb.softmax_cross_entropy(out, y, reduction=options.get("reduction", "mean"))
        (loss + (out * g).sum()).backward()
        return loss.detach()

    assert_same(*both(model, run, **options))
    assert [name for name, _ in finishes] == ([] if "grads" in options else ["finish_shares"])
