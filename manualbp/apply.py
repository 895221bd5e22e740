"""How manualbp's autograd Functions are called: a fast eager path, and autocast.

Every Function here is written once, in the forward + setup_context style that torch.func
(vmap, grad, jacrev) and torch.compile need. That style costs an inspect.signature() bind on every
Function.apply (about 30 us a call on these CPUs, more than a small layer's matmul), so outside
torch.func and torch.compile we run the same forward, setup_context and backward through an
old-style twin Function. Same code, same saved tensors, same results.

Autocast: torch.amp.custom_fwd/custom_bwd store state on the forward's first argument, which in
the setup_context style is the input tensor, not ctx. We do what autocast does for nn.Linear
instead: cast the inputs to the autocast dtype with ordinary differentiable casts and run the
Function with autocast off, so forward and backward see one dtype and the casts' own backward
hands each gradient back in its parameter's dtype.
"""

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd import forward_ad as _forward_ad

_functorch_active = torch._C._are_functorch_transforms_active


def _eager_twin(fn: type[Function]) -> type[Function]:
    """An old-style Function running fn's forward, setup_context and backward unchanged."""

    def forward(ctx, *args):
        output = fn.forward(*args)
        fn.setup_context(ctx, args, output)
        return output

    return type(f"{fn.__name__}Eager", (Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(fn.backward),
    })


def c_apply(twin: type[Function]):
    """An old-style Function's C++ apply, skipping Function.apply's Python wrapper (a signature
    check and a pytree walk that only matter inside torch.func, where we call fn.apply instead)."""
    try:
        return torch._C._FunctionBase.__dict__["apply"].__get__(None, twin)
    except (AttributeError, KeyError, TypeError):  # a torch without it: the public path
        return twin.apply


_TWINS: dict[type[Function], object] = {}


def forward_mode() -> bool:
    """Whether a jvp may follow this forward (a torch.func transform or forward_ad is on): only
    then does setup_context keep tensors for it (under autocast they are real copies)."""
    return not torch.compiler.is_compiling() and (
        _functorch_active() or _forward_ad._current_level >= 0)


def with_jvp(fn: type[Function]) -> type[Function]:
    """Class decorator: fn.with_jvp is fn plus its hand-written forward mode (fn._jvp as jvp).

    torch.compile refuses to trace a Function that defines jvp (a graph break, an error under
    fullgraph=True), and cannot pick another class off fn inside a compiled region either, so fn
    itself stays without one and apply() takes fn.with_jvp under torch.func transforms and
    torch.autograd.forward_ad. Built at import time, once.
    """
    fn.with_jvp = type(fn.__name__, (fn,), {"jvp": staticmethod(fn._jvp), "__doc__": fn.__doc__,
                                            "__module__": fn.__module__})
    return fn


_jit_tracing = torch._C._is_tracing


def tracing() -> bool:
    """True under torch.compile, a torch.func transform, torch.autograd.forward_ad or torch.jit
    tracing: no data-dependent Python there, and only the general Functions (which carry jvp)."""
    return (torch.compiler.is_compiling() or _functorch_active() or _jit_tracing()
            or _forward_ad._current_level >= 0)


def apply(fn: type[Function], *args):
    """fn.apply(*args), through the eager twin when neither torch.func nor compile is tracing.

    Under torch.jit tracing (torch.jit.trace, and torch.onnx.export(..., dynamo=False), which
    traces) the forward's own torch ops are recorded instead: that exporter inlines a Python
    Function's graph and loses track of which output is which (a Linear with gelu, silu or
    softplus came out as its z, g dropped). A traced graph has no hand-written backward either
    way; autograd differentiates the recorded ops, so its gradients stay right.
    """
    if tracing():
        if torch.compiler.is_compiling():
            return fn.apply(*args)
        if _jit_tracing():
            return fn.forward(*args)
        return fn.with_jvp.apply(*args)  # every Function here is @with_jvp
    twin_apply = _TWINS.get(fn)
    if twin_apply is None:
        twin_apply = _TWINS[fn] = c_apply(_eager_twin(fn))
    return twin_apply(*args)


# One C call that says whether autocast is on for any device: the common answer (no) without
# building t.device; a torch without it asks per device.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul in on t's device, or None if autocast is off there."""
    if not _any_autocast():
        return None
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_all(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """Cast floating tensors to dtype (differentiably); leave None and integer tensors alone."""
    return [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    ]
