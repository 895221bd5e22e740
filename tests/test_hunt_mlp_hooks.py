"""MLP never calls its layers, so a hook on a layer never runs: a backward hook there (one
that scales or clips a layer's gradient) was silently skipped, and a layer whose weight was set
to None failed deep inside with an AttributeError. Both are refused in one line, on both
backends and on every path (forward, loss, backprop)."""

import pytest
import torch

import manualbp as mb

D = torch.float64


def _calls(mlp):
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, dtype=D), torch.tensor([0, 1, 2, 0])
    return {"forward": lambda: mlp(x).sum().backward(),
            "loss": lambda: mlp.loss(x, y)[0].backward(),
            "backprop": lambda: mlp.backprop(x, y)}


def _scale_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else 3 * g for g in grad_input)


_HOOKS = {
    "full backward hook": lambda layer: layer.register_full_backward_hook(_scale_grad_input),
    "backward pre-hook": lambda layer: layer.register_full_backward_pre_hook(
        lambda module, grad_output: (2 * grad_output[0],)),
}


@pytest.mark.parametrize("hook", sorted(_HOOKS))
@pytest.mark.parametrize("path", ["forward", "loss", "backprop"])
def test_a_backward_hook_on_a_layer_is_refused_not_skipped(core, hook, path):
    mlp = mb.MLP([5, 6, 3], dtype=D)
    _HOOKS[hook](mlp.layers[1])
    with pytest.raises(ValueError, match=r"MLP: layers\[1\] has backward hooks, which MLP "
                                         r"never runs.*register_full_backward_hook"):
        _calls(mlp)[path]()
    assert all(p.grad is None for p in mlp.parameters())


def test_a_hook_on_the_mlp_itself_still_runs(core):
    mlp = mb.MLP([5, 6, 3], dtype=D)
    seen = []
    mlp.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    _calls(mlp)["forward"]()
    assert seen == [torch.Size([4, 3])]


@pytest.mark.parametrize("path", ["forward", "loss", "backprop"])
def test_a_layer_whose_weight_is_none_is_named(core, path):
    mlp = mb.MLP([5, 6, 3], dtype=D)
    mlp.layers[1].weight = None
    with pytest.raises(ValueError, match=r"MLP: layers\[1\].weight is None; every layer "
                                         r"needs a weight"):
        _calls(mlp)[path]()
