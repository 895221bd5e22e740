"""manualbp.MLP: a fully connected network trained by one hand-written backward pass."""

import contextlib

import torch
from torch import Tensor, nn

from manualbp.activations import check_activation
from manualbp.apply import apply, autocast_dtype, c_apply, cast_all, tracing
from manualbp.backprop import (
    backward_pass,
    forward_pass,
    plan,
    softmax_ce_delta,
    softmax_ce_forward,
)
from manualbp.fused import MLPEagerFunction, MLPFunction, Trace
from manualbp.linear import check_linear_args
from manualbp.loss_checks import check_mlp_target, explain_mlp_target
from manualbp.modules import Linear
from manualbp.native import eager as _native
from manualbp.native import lib as _native_lib
from manualbp.native import serves as _native_serves

_EAGER_DTYPES = (torch.float32, torch.float64)
_NO_CONTEXT = contextlib.nullcontext()
_eager_apply = c_apply(MLPEagerFunction)


class MLP(nn.Module):
    """Fully connected network a[i] = g(a[i-1] W[i]^T + b[i]) with the fused backward.

    Hidden layers use `activation`; the last layer is linear and returns logits, for a softmax
    or logistic output in the loss. sizes=[n_in, n_out] is the slides' single layer of neurons:
    logistic/softmax regression. The whole stack is one autograd node (MLPFunction), and
    `loss(x, y)` folds the softmax cross-entropy output layer into that node too.

    Args:
        sizes: layer widths [n_0, n_1, ..., n_L], at least two, each > 0.
        activation: name in manualbp.ACTIVATIONS for the hidden layers (default "relu").
        bias: give every layer a bias (default True).
        device, dtype: factory kwargs for the parameters.

    Attributes:
        layers: nn.ModuleList of L manualbp.Linear (state_dict keys layers.{i}.weight/.bias),
            initialised exactly as nn.Linear would be under the same seed.
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        sizes = _check_sizes(sizes)
        self.sizes = sizes
        self.activation = check_activation(activation, "MLP")
        acts = [activation] * (len(sizes) - 2) + ["identity"]
        self.layers = nn.ModuleList(
            Linear(n_in, n_out, bias=bias, activation=act, device=device, dtype=dtype)
            for n_in, n_out, act in zip(sizes[:-1], sizes[1:], acts, strict=True)
        )

    def forward(self, x: Tensor, trace: Trace | None = None) -> Tensor:
        """Logits a[L], shape (*, n_L), for x of shape (*, n_0)."""
        return self._run(x, None, trace)[0]

    def loss(self, x: Tensor, target: Tensor, trace: Trace | None = None) -> tuple[Tensor, Tensor]:
        """(mean softmax cross-entropy, logits) with delta[L] = (yhat - y) / m folded in.

        Same value and gradients as F.cross_entropy(self(x), target), in one autograd node.

        Args:
            x: (*, n_0). target: class indices of shape (*), each in [0, n_L), or -100 to leave
                that example out of the mean (F.cross_entropy's default ignore_index).
        """
        target = check_mlp_target(x, target)
        try:
            logits, loss = self._run(x, target, trace)
        except IndexError as error:  # the loss kernel refused a class index
            refused = error
        else:
            return loss, logits
        explain_mlp_target("MLP.loss", target, self.sizes[-1])  # say which, and why
        raise refused

    def backprop(self, x: Tensor, target: Tensor, accumulate: bool = True) -> Tensor:
        """The slides' training pass with no autograd at all: forward, delta[L] = (yhat - y) / m,
        the delta recursion, and each parameter's gradient added to its .grad.

        Gives the gradients of `self.loss(x, target)[0].backward()` (the mean softmax
        cross-entropy) without building a graph, so a step costs less; pair it with any
        torch.optim optimizer. Differentiates the parameters only (x.grad is left alone), skips
        parameters with requires_grad=False, and follows autocast like loss().
        DistributedDataParallel averages gradients in autograd hooks, which this pass never
        triggers: under DDP use loss().

        Args:
            x: (*, n_0). target: class indices of shape (*), as loss() takes them.
            accumulate: add to .grad, as backward() does (default); False replaces .grad, so
                no zero_grad() is needed between steps.

        Returns:
            the loss, detached.
        """
        target = check_mlp_target(x, target, "MLP.backprop")
        params, activations = self._flat()
        check_linear_args("MLP.backprop", x, params[0], params[1])
        dtype = autocast_dtype(x)
        lib = _native(x) if dtype is None and _native_serves(self) else None
        with torch.no_grad() if lib is None else _NO_CONTEXT:  # C++ turns grad mode off itself
            try:
                if lib is not None:  # the same pass in C++; it writes .grad itself
                    return lib.backprop(x, target, params, activations, accumulate)
                if dtype is None:
                    grads, loss = self._backprop(x, target, params, activations, params)
                else:
                    x, *weights = cast_all(dtype, x, *params)
                    with torch.autocast(x.device.type, enabled=False):
                        grads, loss = self._backprop(x, target, weights, activations, params)
            except IndexError as error:  # the loss kernel refused a class index
                refused = error
            else:
                refused = None
        if refused is not None:
            explain_mlp_target("MLP.backprop", target, self.sizes[-1])  # say which, and why
            raise refused
        for p, g in zip(params, grads, strict=True):  # .grad never requires grad: no graph
            if g is None:
                continue
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if p.grad is None or not accumulate:
                p.grad = g
            else:
                p.grad.add_(g)
        return loss

    def _backprop(self, x: Tensor, target: Tensor, weights, activations, params):
        """(grads W1, b1, ..., loss) by the shared pass, in weights' dtype; no grad mode, no
        autocast here. params: the parameters themselves, for which ones want a gradient."""
        steps = plan(activations)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = target.reshape(-1)
        outs, zs = forward_pass(x2, steps, weights, inplace=True)
        z_L = outs[-1]
        dtype = z_L.dtype
        if steps[-1].g is None:
            outs[-1] = None  # identity output layer: backward never reads a[L]
        log_yhat, loss, count = softmax_ce_forward(
            z_L if z_L.element_size() >= 4 else z_L.float(), y)
        del z_L  # a[L] and log yhat are done with once delta[L] exists: free them before the
        delta_L = softmax_ce_delta(torch.ones_like(loss), log_yhat, y, count)  # recursion
        del log_yhat
        if delta_L.dtype != dtype:
            delta_L = delta_L.to(dtype)
        needs = (False, *(p is not None and p.requires_grad for p in params))
        grads, _ = backward_pass(delta_L, True, x2, outs, zs, weights[0::2], steps, needs,
                                 scratch=True)
        return grads, loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """nn.Module.zero_grad, as a loop over the layers' own parameters: the generic walk over
        named_parameters() costs 18-35 us a call here, a tenth of a small training step."""
        layers = self.layers._modules.values()
        if not set_to_none or self._parameters or any(layer._modules for layer in layers):
            return super().zero_grad(set_to_none)  # parametrized layers, set_to_none=False, ...
        for layer in layers:
            for p in layer._parameters.values():
                if p is not None:
                    p.grad = None

    def _flat(self) -> tuple[list[Tensor | None], tuple[str, ...]]:
        """[W1, b1, ..., WL, bL] and the activation names, read from the layers each call."""
        params: list[Tensor | None] = []
        activations = []
        for layer in self.layers:
            own = layer._parameters  # direct: nn.Module.__getattr__ is the slow way in
            W = own.get("weight")
            params += (layer.weight if W is None else W,  # None: a parametrization's property
                       own["bias"] if "bias" in own else layer.bias)
            activations.append(layer.activation)
        return params, tuple(activations)

    def _run(self, x: Tensor, target: Tensor | None, trace: Trace | None):
        """(logits, loss or None) through the lean eager Function or, under torch.func,
        torch.compile, autocast or a Trace, through MLPFunction."""
        params, activations = self._flat()
        check_linear_args("MLP", x, params[0], params[1])
        dtype = autocast_dtype(x)
        if dtype is None and trace is None and x.dtype in _EAGER_DTYPES and not tracing():
            lib = _native_lib() if _native_serves(self) else None  # the C++ twin when built
            if lib is not None:
                out = lib.mlp(x, target, activations, params)
                return (out[0], None) if target is None else out
            out = _eager_apply(x, target, activations, *params)
            return (out, None) if target is None else out
        if dtype is None:
            out = apply(MLPFunction, x, target, activations, trace, *params)
        else:
            x, *params = cast_all(dtype, x, *params)
            with torch.autocast(x.device.type, enabled=False):
                out = apply(MLPFunction, x, target, activations, trace, *params)
        # the folded loss is float32 under autocast already, like F.cross_entropy there
        return out[0], (out[-1] if target is not None else None)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation}"


def _check_sizes(sizes) -> list[int]:
    try:
        sizes = [int(s) for s in sizes]
        ok = len(sizes) >= 2 and all(s > 0 for s in sizes)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"MLP: expected sizes to be at least two positive widths like [64, 128, 10], "
            f"got {sizes!r}"
        )
    return sizes
