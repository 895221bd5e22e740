"""MLP's checks: what the one-node pass cannot run, refused in one line that names the layer.

MLP reads its layers' parameters and runs one node (or one engine-free pass) for the whole
stack, so what a layer-by-layer forward would catch, or silently honour (hooks, a computed
weight, a broadcast bias, mixed dtypes), is checked here.
"""

import operator

from torch import Tensor, nn
from torch.nn.utils import parametrize

from manualbp.linear import check_real_weight


def check_layers(where: str, params: list[Tensor | None]) -> None:
    """Raise naming the first layer whose weight or bias the pass cannot run with layer 1's."""
    dtype = params[0].dtype
    for i in range(len(params) // 2):
        for name, t in (("weight", params[2 * i]), ("bias", params[2 * i + 1])):
            if t is None:
                continue
            check_real_weight(f"{where}: layers[{i}].{name}", t)
            if t.dtype != dtype:
                raise TypeError(
                    f"{where}: expected every layer's weight and bias in one dtype, got "
                    f"layers[{i}].{name} in {t.dtype}, layers[0].weight in {dtype}; cast the "
                    "network with mlp.to(dtype)"
                )


def check_bias_shapes(where: str, params: list[Tensor | None]) -> None:
    """Refuse a bias not shaped (n_out,) past layer 1 (check_linear_args holds layer 1's): F.linear
    broadcasts one, and autograd sums its gradient back to its shape, but backprop() writes .grad
    itself, so a (1,) bias would get an (n_out,) gradient."""
    for i in range(1, len(params) // 2):
        W, b = params[2 * i], params[2 * i + 1]
        if b is not None and b.shape != W.shape[:1]:
            raise ValueError(
                f"{where}: expected layers[{i}].bias of shape ({W.shape[0]},), got "
                f"{tuple(b.shape)}; give each layer a bias of its own width (loss().backward() "
                "accepts a broadcast bias)"
            )


def check_layer(i: int, layer: nn.Module, W: Tensor) -> None:
    """Refuse what the one-node pass would silently ignore: it reads the layers' weights and never
    calls the layers, so their forward hooks (old-style torch.nn.utils.weight_norm and
    spectral_norm are such hooks) and backward hooks never run; a weight set to None; and a
    computed weight not made by a parametrization, whose gradient has nowhere to go."""
    if layer._forward_pre_hooks or layer._forward_hooks:
        raise ValueError(
            f"MLP: layers[{i}] has forward hooks (e.g. from torch.nn.utils.weight_norm or "
            "spectral_norm), which MLP never runs: it reads the weights and runs one node for the "
            "whole stack; use torch.nn.utils.parametrizations.weight_norm / spectral_norm, or "
            "mb.convert an nn.Sequential of nn.Linear instead"
        )
    if layer._backward_hooks or layer._backward_pre_hooks:
        raise ValueError(
            f"MLP: layers[{i}] has backward hooks, which MLP never runs: it reads the weights "
            "and runs one node for the whole stack, so no layer's backward is called; hook the "
            "MLP itself (mlp.register_full_backward_hook), or mb.convert an nn.Sequential of "
            "nn.Linear instead (a Linear with hooks runs on its own there)"
        )
    if W is None:
        raise ValueError(
            f"MLP: layers[{i}].weight is None; every layer needs a weight: give it a "
            f"Parameter of shape (n_out, n_in) (layer.weight = nn.Parameter(...))"
        )
    if W.grad_fn is not None and not parametrize.is_parametrized(layer):
        raise ValueError(
            f"MLP: layers[{i}].weight is a computed tensor, not a Parameter; register the "
            "computation with torch.nn.utils.parametrize.register_parametrization"
        )


def check_sizes(sizes) -> list[int]:
    """sizes as a list of ints; refuse anything but two or more positive integers, naming it."""
    example = "like [64, 128, 10]"
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ValueError(f"MLP: expected sizes to be a list of layer widths {example}, "
                        f"got {sizes!r}")
    sizes = list(sizes)
    widths = []
    for i, s in enumerate(sizes):
        try:  # ints and int-like scalars (numpy, 0-dim integer tensors); never bool or float
            width = operator.index(s) if not isinstance(s, bool) else None
        except TypeError:
            width = None
        if width is None or width <= 0:
            raise ValueError(
                f"MLP: expected every width in sizes to be a positive integer, got sizes[{i}] = "
                f"{s!r}" + (f" ({type(s).__name__})" if width is None else "")
                + f" in {sizes!r}"
            )
        widths.append(width)
    if len(widths) < 2:
        raise ValueError(
            f"MLP: expected sizes to hold at least two widths (inputs, outputs) {example}, "
            f"got {sizes!r}"
        )
    return widths
