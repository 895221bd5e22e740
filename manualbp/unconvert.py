"""unconvert: the way back from convert, to plain torch modules (like peft's merge_and_unload).

Every manualbp.Linear that convert made becomes an nn.Linear again, every Conv1D its own class,
and every activation that convert fused goes back into its slot: the same objects and
Parameters, the same outputs, so that quantize_dynamic, TorchScript and deployment tools see
ordinary modules.
"""

import logging
from typing import Literal, TypeVar, overload

from torch import nn

from manualbp.chain import Chain
from manualbp.conv1d import is_converted_conv1d
from manualbp.convert import UNFUSED, ConversionReport
from manualbp.mlp import MLP
from manualbp.modules import Linear

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


@overload
def unconvert(module: M, *, report: Literal[False] = ...) -> M: ...
@overload
def unconvert(module: M, *, report: Literal[True]) -> tuple[M, ConversionReport]: ...
def unconvert(module, *, report=False):
    """Undo convert in place: plain nn.Linear / Conv1D and the original activation modules again.

    The report's converted lists the layers made plain again, fused the (linear, activation)
    pairs put back apart, chained the manualbp.Chain made nn.Sequential again, and skipped the
    manualbp layers that have no plain form with the same state_dict: a manualbp.Linear built
    with an activation of its own (not by convert), and MLP, which is one node by design.

    Returns:
        module, or (module, ConversionReport) when report=True.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"unconvert: expected an nn.Module, got {type(module).__name__}")
    rep = ConversionReport(undo=True)
    modules = list(module.named_modules())
    names = {id(m): name for name, m in modules}
    unfused = set()
    for seq_name, seq in modules:  # put each fused activation back first
        if not isinstance(seq, nn.Sequential):
            continue
        if type(seq) is Chain:
            seq.__class__ = nn.Sequential
            rep.chained.append(seq_name)
        slots = list(seq._modules.items())
        for (_, linear), (slot, ident) in zip(slots, slots[1:], strict=False):
            act = getattr(ident, UNFUSED, None) if type(ident) is nn.Identity else None
            if act is None or not isinstance(linear, Linear):
                continue
            act.train(ident.training)
            seq._modules[slot] = act
            linear.activation = "identity"
            unfused.add(id(linear))
            rep.fused.append((names[id(linear)], f"{seq_name}.{slot}" if seq_name else slot))
    inside_mlp = {id(sub) for _, m in modules if isinstance(m, MLP) for sub in m.modules()}
    for name, m in modules:
        if isinstance(m, MLP):
            rep.skipped.append((name, "manualbp.MLP is one node by design; rebuild it as an "
                                      "nn.Sequential of nn.Linear from its state_dict"))
        elif id(m) in inside_mlp:
            continue
        elif type(m) is Linear:
            if m.activation != "identity":
                rep.skipped.append((name, f"built as manualbp.Linear(..., activation="
                                          f"{m.activation!r}); nn.Linear has no activation"))
                continue
            m.__class__ = nn.Linear
            m.__dict__.pop("activation", None)
            rep.converted.append(name)
        elif is_converted_conv1d(m):
            m.__class__ = type(m).manualbp_original
            m.__dict__.pop("activation", None)
            rep.converted.append(name)
    logger.info("%s", rep)
    return (module, rep) if report else module
