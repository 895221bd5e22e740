"""manualbp.Chain: a converted nn.Sequential whose runs of manualbp.Linear are one node each.

convert (fuse=True) swaps the class of every plain nn.Sequential that holds two or more
consecutive manualbp.Linear (the nn.Identity a fused activation leaves in its slot counts as
part of the run) for Chain, in place, as it does for Linear: the same object, children,
indices, state_dict keys, hooks and mode. mb.unconvert swaps it back.

Chain.forward computes what nn.Sequential.forward computes, child after child, except that a run
of Linears goes through one call of the MLP node (manualbp.mlp.run_node, what mb.MLP runs):
one autograd node instead of one per layer, one Python call instead of one nn.Module call per
child. Same kernels in the same order, so the same bits. Whatever the node would not do exactly
as the layers do runs layer by layer, nn.Sequential's way, decided afresh at every call (nothing
is cached, so a parameter replaced, frozen or cast, a hook added, shows at once; where the C++
core is built, native chain_flat confirms the usual run in C++, and _flat decides the rest):
    hooks on the Sequential, on any module of the run, or global module hooks; torch.func,
    torch.compile, torch.jit tracing or forward-mode AD; layers that differ in rule, or direct
    feedback alignment; a layer twice in the run; a weight or bias that is not the layer's own
    Parameter (a parametrization, a plain tensor set in its place) or a Linear with submodules,
    a forward of its own or a compiled call (module.compile()); an input or parameter the
    per-layer path would refuse or treat otherwise (dtypes that differ, widths that do not
    chain, a nested or sparse input, an input with leading dims that is not contiguous).
A run the node refuses for a reason not checked here (a device mismatch) runs layer by layer
too, which then raises the layers' own error.
"""

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from manualbp.apply import tracing
from manualbp.mlp import run_node
from manualbp.modules import Linear
from manualbp.native import lib as _native_lib
from manualbp.rules import DFA, PER_LAYER, RULES, feedback_of

_Identity = nn.Identity
_STRIDED = torch.strided
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_sequential_forward = nn.Sequential.forward
_grad_enabled = torch.is_grad_enabled


class Chain(nn.Sequential):
    """nn.Sequential whose runs of >= 2 manualbp.Linear each run as one MLP node (see the
    module docstring); made by mb.convert, undone by mb.unconvert."""

    def forward(self, input):
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _global_hooks() or tracing()):
            return _sequential_forward(self, input)
        run: list[nn.Module] = []  # the Linears (and Identities after one) not yet run
        for m in self._modules.values():
            kind = type(m)
            if kind is Linear or (kind is _Identity and run):
                run.append(m)
                continue
            if run:
                input = run_chain(run, input)
                run = []
            input = m(input)
        return run_chain(run, input) if run else input

    def zero_grad(self, set_to_none: bool = True) -> None:
        """nn.Module.zero_grad, as a loop over the children's own parameters when no child has
        submodules: the generic walk over named_parameters() costs 18-35 us a call, a tenth of a
        small training step (as MLP.zero_grad)."""
        if not set_to_none or self._parameters or "_is_replica" in self.__dict__:
            return super().zero_grad(set_to_none)  # the generic walk (and its warning)
        for m in self._modules.values():
            if m is not None and m._modules:  # a nested or parametrized child: the generic walk
                return super().zero_grad(set_to_none)
        for m in self._modules.values():
            if m is not None:
                for p in m._parameters.values():
                    if p is not None:
                        p.grad = None


def _global_hooks() -> bool:
    """Whether any global module hook is registered (each child's call would run it)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def has_run(seq: nn.Module) -> bool:
    """Whether seq holds two consecutive manualbp.Linear, nn.Identity between them allowed."""
    linears = 0
    for m in seq._modules.values():
        if type(m) is Linear:
            linears += 1
            if linears == 2:
                return True
        elif type(m) is not _Identity:
            linears = 0
    return False


def run_chain(run: list[nn.Module], x: Tensor) -> Tensor:
    """x through run (Linears and the Identities between them) as one node when that gives what
    the layers give, else layer by layer."""
    lib = _native_lib()  # its chain_flat confirms the usual run in C++, else _flat decides
    flat = (lib.chain_flat(run, x, _Identity) if lib is not None else None) or _flat(run, x)
    if flat is not None:
        params, activations, layers, rule = flat
        last = None
        if x.dim() > 2 and activations[-1] != "identity":
            # the node's backward reads dL/da[L] as rows, a contiguous copy when it arrives as
            # a non-contiguous (*, n) view, and some g' kernels (gelu's, softplus') round
            # differently on contiguous and strided memory: the last layer reads it as it is
            last, params, activations, layers = layers[-1], params[:-2], activations[:-1], \
                layers[:-1]
        if len(layers) >= 2:
            feedback = source = None
            if rule != "backprop" and _grad_enabled():  # as Linear.forward asks for B
                feedback, source = [feedback_of(layer) for layer in layers], PER_LAYER
            try:
                x = run_node(x, None, None, params, activations, layers, feedback, source)[0]
            except Exception:  # refused: the layers say why in their own words (or run after all)
                pass
            else:
                return x if last is None else last(x)  # the Identities after it: no hooks
    for m in run:
        x = m(x)
    return x


def _flat(run: list[nn.Module], x: Tensor):
    """(params W1, b1, ..., activations, layers, rule) when the node serves run for x exactly as
    the layers would, else None. Every read is direct (nn.Module.__getattr__ costs ~0.6 us), and
    each tensor attribute is read once (~40 ns each: this is most of the Chain's own cost)."""
    if type(x) is not Tensor or x.layout is not _STRIDED or x.is_nested:
        return None  # a subclass, sparse or nested input: the layers' own way
    dtype = x.dtype
    xs = x.shape
    if dtype not in _DTYPES or not xs or (len(xs) > 2 and not x.is_contiguous()):
        return None  # (B, T, n) strided: F.linear on it is matmul + bias, not the rows' addmm
    width = xs[-1]
    params: list[Tensor | None] = []
    activations = []
    layers: list[nn.Module] = []
    rule = None
    for m in run:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
        if type(m) is _Identity:
            continue
        own, d = m._parameters, m.__dict__
        W = own.get("weight")
        if (W is None or "bias" not in own or m._modules or "forward" in d or m in layers
                or d.get("_compiled_call_impl") is not None):
            return None  # computed or plain-tensor weight, parametrized, patched, reused, compiled
        ws = W.shape
        if W.dtype is not dtype or len(ws) != 2 or ws[1] != width or W.layout is not _STRIDED:
            return None
        width = ws[0]
        b = own["bias"]
        if b is not None and (b.dtype is not dtype or len(bs := b.shape) != 1 or bs[0] != width):
            return None
        r = d.get("rule", "backprop")
        if rule is None:
            rule = r
        elif r != rule:
            return None
        params.append(W)
        params.append(b)
        activations.append(m.activation)
        layers.append(m)
    if len(layers) < 2 or rule == DFA or rule not in RULES:
        return None
    return params, tuple(activations), layers, rule
