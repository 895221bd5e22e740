"""Hugging Face-style Conv1D: a linear layer whose weight is stored (in, out), found by layout.

GPT-2 and models derived from it use transformers' Conv1D(nf, nx): weight (nx, nf), bias (nf,),
forward x @ weight + bias. That is z = a_prev W^T + b with W = weight^T, so the hand-written
backward serves it unchanged; W^T is a view, and autograd hands grad_W back transposed into the
(in, out) layout of the Parameter. Detected by class name and layout, so no transformers import.
"""

from torch import Tensor, nn

from manualbp.linear import _apply, check_linear_args

_CONVERTED: dict[type, type] = {}  # original Conv1D class -> its manualbp subclass


class _ManualConv1D:
    """Mixin put in front of the original Conv1D class: same object, same Parameters, same
    state_dict, isinstance(m, the original class) still holds; only forward differs."""

    activation = "identity"

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight.t()  # (nf, nx): torch's (out, in) layout, as a view
        try:
            return _apply(x, W, self.bias, self.activation)
        except Exception as error:  # checked only once F.linear has refused the input
            refused = error
        check_linear_args("Conv1D", x, W, self.bias)
        raise refused

    def extra_repr(self) -> str:
        nx, nf = self.weight.shape
        return f"nf={nf}, nx={nx}, manualbp backward"

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time, so pickle (torch.save of a whole model) could not
        # find it by name: store the original class, convert again on load.
        return _rebuild, (self.manualbp_original, self.__dict__)


def _rebuild(cls: type, state: dict) -> nn.Module:
    m = cls.__new__(cls)
    m.__dict__.update(state)
    convert_conv1d(m)
    return m


def is_conv1d(m: nn.Module) -> bool:
    """Whether m looks like transformers' Conv1D: named so, weight (nx, nf), bias (nf,) or
    None, int nf, no other parameters or children."""
    if type(m).__name__ != "Conv1D" or isinstance(m, (nn.Linear, _ManualConv1D)):
        return False
    W, b, nf = m._parameters.get("weight"), m._parameters.get("bias"), getattr(m, "nf", None)
    return (isinstance(nf, int) and W is not None and W.dim() == 2 and W.shape[1] == nf
            and (b is None or tuple(b.shape) == (nf,))
            and set(m._parameters) <= {"weight", "bias"} and not m._modules)


def why_conv1d_misfits(m: nn.Module) -> str:
    """For the report: why a module named Conv1D was not taken for transformers' layout."""
    W = m._parameters.get("weight")
    shape = None if W is None else tuple(W.shape)
    return (f"{type(m).__name__} does not have transformers' Conv1D layout (int nf, weight "
            f"(nx, nf), bias (nf,)); got nf={getattr(m, 'nf', None)!r}, weight {shape}")


def convert_conv1d(m: nn.Module) -> None:
    """Swap m's class for the manualbp subclass of its own class, in place."""
    cls = type(m)
    sub = _CONVERTED.get(cls)
    if sub is None:
        sub = _CONVERTED[cls] = type(cls.__name__, (_ManualConv1D, cls),
                                     {"__module__": cls.__module__, "manualbp_original": cls})
    m.__class__ = sub


def is_converted_conv1d(m: nn.Module) -> bool:
    return isinstance(m, _ManualConv1D)
