"""mb.per_example's per-model coverage cache and its lean paths, against the oracle.

The cache (manualbp.per_example.coverage) must notice every change that alters what a block
covers between blocks: a parameter frozen or unfrozen, replaced, a module added, a class
swapped in place by convert. The lean paths (the eager twins carrying the probes, the stacked
row norms) must give the oracle's norms and clipped gradients.
"""

import copy
import sys

import pytest
import torch
from test_per_example import check, data, weighted
from torch import nn

import manualbp as mb
from manualbp import native

pe_module = sys.modules["manualbp.per_example"]  # mb.per_example is the function


def stack(bias=(True, True, True), activation="tanh"):
    torch.manual_seed(11)
    sizes = [5, 7, 6, 4]
    acts = [activation, activation, "identity"]
    return nn.Sequential(*(mb.Linear(i, o, bias=b, activation=a, dtype=torch.float64)
                           for i, o, a, b in zip(sizes[:-1], sizes[1:], acts, bias, strict=True)))


def per_example_loss(out, G_n):
    return (out * G_n).sum()


def run_and_check(model, max_norm, frozen=()):
    """One block on model (outside weighted-mean loss); norms, norms_by_param and .grad against
    vmap(grad) of the same model, with the parameters at the indices in frozen left out."""
    x, G, _ = data(())
    model.zero_grad(set_to_none=True)
    return check(model, lambda m: weighted("mean")(m(x), G).backward(), copy.deepcopy(model), x, G,
                 per_example_loss, "mean", max_norm, frozen)


def test_cache_is_reused_while_nothing_changes():
    model = stack()
    first = pe_module.coverage(model)
    assert pe_module.coverage(model) is first
    run_and_check(model, 0.3)
    assert pe_module.coverage(model) is first


@pytest.mark.parametrize("max_norm", [None, 0.3])
def test_freezing_and_unfreezing_between_blocks(max_norm):
    model = stack()
    run_and_check(model, max_norm)
    model[1].weight.requires_grad_(False)  # parameter index 2
    run_and_check(model, max_norm, frozen=(2,))
    model[1].weight.requires_grad_(True)
    run_and_check(model, max_norm)


def test_a_replaced_parameter_is_covered_and_the_old_one_is_not():
    model = stack()
    run_and_check(model, 0.3)
    old = model[2].weight
    torch.manual_seed(2)
    model[2].weight = nn.Parameter(torch.randn_like(old))
    old.grad = None
    run_and_check(model, 0.3)
    assert old.grad is None  # the block clipped the new one only


def test_a_module_added_between_blocks_is_reported_and_refused():
    model = stack()
    run_and_check(model, 0.3)
    model.add_module("3", nn.Linear(4, 4, dtype=torch.float64))  # not a manualbp layer
    with pytest.raises(ValueError, match=r"max_norm clips only .* not: 3\.weight, 3\.bias"):
        mb.per_example(model, max_norm=0.3)
    assert mb.per_example(model).uncovered == ["3.weight", "3.bias"]


def test_a_class_swapped_in_place_by_convert():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 4)).double()
    assert mb.per_example(model).uncovered == ["0.weight", "0.bias", "1.weight", "1.bias"]
    modules = list(model.modules())
    converted = mb.convert(model)
    assert list(converted.modules()) == modules  # the same objects: only their classes changed
    pe = run_and_check(converted, 0.3)
    assert pe.uncovered == []


@pytest.mark.parametrize("activation, function", [("tanh", "LinearActEagerFunction"),
                                                  ("relu", "LinearActEagerFunction"),
                                                  ("gelu", "LinearActFunction")])
def test_layers_inside_a_block_take_the_lean_function_where_it_serves(activation, function):
    # the C++ node when built; in Python, g' read off a: the old-style eager twin carries the
    # probe; g' of z: the general Function
    model = stack(activation=activation)
    x, G, _ = data(())
    with native.paused(), mb.per_example(model):
        out = model[0](x)
        assert type(out.grad_fn).__name__.startswith(function)
        weighted("mean")(model[2](model[1](out)), G).backward()
    if native.load() is not None:
        with mb.per_example(model):
            out = model[0](x)
            assert "LinearActNode" in out.grad_fn.name()
            weighted("mean")(model[2](model[1](out)), G).backward()
    run_and_check(model, 0.3)


def test_mlp_node_inside_a_block_takes_the_cpp_node_else_mlp_function():
    model = mb.MLP([5, 7, 6, 4], activation="tanh", dtype=torch.float64)
    x, G, _ = data(())
    with native.paused(), mb.per_example(model):
        out = model(x)
        assert type(out.grad_fn).__name__.startswith("MLPFunction")  # probes in its trace slot
        weighted("mean")(out, G).backward()
    if native.load() is not None:
        with mb.per_example(model):
            out = model(x)
            assert "MLPNode" in out.grad_fn.name()
            weighted("mean")(out, G).backward()
    with mb.per_example(model, reduction="sum") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert type(out.grad_fn).__name__.startswith("MLPFunction")  # autocast: the general one
        out.float().sum().backward()
    assert pe.norms.shape == (x.shape[0],)


@pytest.mark.parametrize("bias, stacked", [((True, True, True), True),
                                           ((False, False, False), True),
                                           ((False, True, True), False),
                                           ((True, False, False), False)])
def test_stacked_rows_serve_uniform_stacks_and_a_mix_takes_sq_norms(bias, stacked, monkeypatch):
    model = stack(bias=bias)
    took = []
    real = pe_module._stackable
    monkeypatch.setattr(pe_module, "_stackable", lambda cs: took.append(real(cs)) or took[-1])
    run_and_check(model, 0.3)  # the C++ finish where built
    with native.paused():
        run_and_check(model, 0.3)  # the Python finish
    assert took == [stacked, stacked]
