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

import manualbp as mb
from manualbp import native


@pytest.fixture(scope="module", autouse=True)
def built():
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")


def step(mlp, x, y, accumulate, **options):
    """One backprop() in a block on top of a prior .grad; (norms, by param, grads, samples)."""
    for p in mlp.parameters():
        p.grad = torch.full_like(p, 0.25)
    with mb.per_example(mlp, **options) as pe:
        loss = mlp.backprop(x, y, accumulate=accumulate)
    samples = {n: p.grad_sample for n, p in mlp.named_parameters() if hasattr(p, "grad_sample")}
    for p in mlp.parameters():
        p.__dict__.pop("grad_sample", None)
    return (loss, pe.norms, pe.norms_by_param,
            {n: p.grad for n, p in mlp.named_parameters()}, samples)


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
    mine = step(mlp, x, y, accumulate, **options)
    with native.paused():
        ref = step(mlp, x, y, accumulate, **options)
    for what, a, b in zip(("loss", "norms"), mine[:2], ref[:2], strict=True):
        assert_equal(a, b, what)
    for what, a, b in zip(("by param", "grad", "grad_sample"), mine[2:], ref[2:], strict=True):
        assert a.keys() == b.keys(), what
        for name in a:
            if a[name] is None or b[name] is None:
                assert a[name] is b[name] is None, f"{what}: {name}"
            else:
                assert_equal(a[name], b[name], f"{what}: {name}")


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
