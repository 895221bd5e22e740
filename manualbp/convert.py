"""convert: give an existing model manualbp's hand-written backward, layer by layer.

Every plain nn.Linear becomes a manualbp.Linear, and inside an nn.Sequential a Linear directly
followed by an activation module that manualbp.ACTIVATIONS covers exactly is fused with it: the
Linear computes a = g(z) itself and the activation's slot becomes nn.Identity, so indices and
state_dict keys stay as they were. An nn.Sequential that then holds two or more consecutive
manualbp.Linear becomes a manualbp.Chain (its class swapped in place too), which runs each such
run of layers as one node, the one mb.MLP runs.

How a Linear is converted: its class is swapped in place (the way torch's own
nn.utils.parametrize does it), not rebuilt. The layer stays the same object, so its Parameters
(tied ones too), hooks and their handles, device, dtype, requires_grad, train/eval mode and any
attribute other code set on it carry over without copying, an optimizer built beforehand keeps
stepping the same tensors, and a layer reachable by several names is converted once for all.
"""

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal, TypeVar, overload

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from manualbp.chain import Chain, has_run
from manualbp.conv1d import (
    convert_conv1d,
    is_conv1d,
    is_converted_conv1d,
    why_conv1d_misfits,
)
from manualbp.modules import Linear
from manualbp.rules import DFA, attach, check_rule

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
UNFUSED = "manualbp_unfused"  # on the nn.Identity in a fused activation's slot: that activation

# Activation modules a Linear can absorb: (type, manualbp name, the settings that name assumes).
# Exact types only: a subclass may compute something else.
_FUSABLE = [
    (nn.ReLU, "relu", {}),
    (nn.Tanh, "tanh", {}),
    (nn.Sigmoid, "sigmoid", {}),
    (nn.SiLU, "silu", {}),
    (nn.LeakyReLU, "leaky_relu", {"negative_slope": 0.01}),
    (nn.ELU, "elu", {"alpha": 1.0}),
    (nn.Softplus, "softplus", {"beta": 1.0, "threshold": 20.0}),
    (nn.GELU, "gelu", {"approximate": "none"}),
    (nn.GELU, "gelu_tanh", {"approximate": "tanh"}),
]


@dataclass
class ConversionReport:
    """What one convert call did, by qualified name as in module.named_modules() ("" = root).

    Attributes:
        converted: nn.Linear layers that are now manualbp.Linear (fused ones included).
        fused: (linear, activation) pairs; the activation's slot now holds nn.Identity.
        skipped: (name, reason) for linear-like modules left alone, names listed in skip, and
            activations next to a Linear that were not fused.
        chained: nn.Sequential that are now manualbp.Chain (unconvert: made nn.Sequential again).
    """

    converted: list[str] = field(default_factory=list)
    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    undo: bool = False  # made by unconvert: converted = made plain, fused = put back apart
    chained: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.undo:
            lines = [f"unconvert: {len(self.converted)} made plain again, {len(self.fused)} "
                     f"activations put back, {len(self.skipped)} skipped"]
        else:
            lines = [f"convert: {len(self.converted)} Linear converted, {len(self.fused)} fused "
                     f"with their activation, {len(self.skipped)} skipped"]
        lines += [f"  {'plain' if self.undo else 'converted'} {name or '<root>'}"
                  for name in self.converted]
        lines += [f"  {'unfused' if self.undo else 'fused  '}   {linear} + {act}"
                  for linear, act in self.fused]
        lines += [f"  skipped   {name or '<root>'}: {why}" for name, why in self.skipped]
        lines += [f"  {'unchained' if self.undo else 'chained  '} {name or '<root>'}"
                  for name in self.chained]
        return "\n".join(lines)


@overload
def convert(
    module: M, *, fuse: bool = ..., skip: Iterable[str] = ..., report: Literal[False] = ...,
    rule: str = ...,
) -> M: ...
@overload
def convert(
    module: M, *, fuse: bool = ..., skip: Iterable[str] = ..., report: Literal[True],
    rule: str = ...,
) -> tuple[M, ConversionReport]: ...
def convert(module, *, fuse=True, skip=(), report=False, rule="backprop"):
    """Swap every plain nn.Linear in module for manualbp.Linear, in place; fuse g where safe.

    Always in place (to keep the original, pass copy.deepcopy(module)); mb.unconvert undoes it.
    The report is logged at INFO on the "manualbp.convert" logger and returned when report=True.
    Hugging Face's Conv1D (weight stored (in, out); found by name and layout, see
    manualbp.conv1d) is converted too, to a manualbp subclass of its own class.

    The contract of a fused Linear: it is the pair Linear + g from then on. Called directly or
    through a slice of its Sequential it returns g(z), and hooks registered on it afterwards see
    g(z) and dL/dg(z). fuse=False keeps every Linear returning z.

    With fuse=True, every nn.Sequential (exactly that class, not a subclass) that then holds a
    run of two or more consecutive manualbp.Linear (the nn.Identity in a fused activation's
    slot, or any other, may sit between them) becomes a manualbp.Chain, its class swapped in
    place as for Linear (children, indices, state_dict keys, hooks and mode stay), reported in
    report.chained. Chain runs each such run as one call of the node mb.MLP runs, with the same
    results bit for bit and a cheaper step; whatever that node would not do exactly as the
    layers do (hooks on the Sequential or its layers, torch.func or torch.compile tracing,
    mixed rules, a parametrized weight, ...) runs layer by layer as nn.Sequential would, decided
    at each call (see manualbp.chain).

    Left alone, each reported in report.skipped with the reason:
      * Linear subclasses, e.g. nn.MultiheadAttention's out_proj, whose weight
        F.multi_head_attention_forward reads directly (its forward never runs), LazyLinear
        before its first forward, parametrized Linears;
      * Linears with complex, integer or sparse weights (the backward is real and dense), and
        any other linear-like module (quantized layers, other Linear-, Dense- or Conv1D-named
        modules that do not have Conv1D's layout);
      * whatever skip names, with everything below it, by whichever name it is reached;
      * fusion of activation modules whose settings differ from manualbp's g (e.g.
        LeakyReLU(0.2)), of a Linear reachable by more than one name (g would reach its other
        uses too), of a Linear with forward or backward hooks (they would see g(z), not z), and of
        an activation with hooks (they would be lost with the module).
    Activations outside an nn.Sequential (an attribute, or F.gelu in a forward) are never fused:
    only Sequential fixes the order of calls (not its subclasses that override forward, other
    than manualbp.Chain, whose calls are Sequential's).
    Layers that are manualbp.Linear already are not touched or reported: converting twice changes
    nothing more.

    nn.TransformerEncoderLayer in eval mode with no grad to compute takes a fast path that reads
    the weights directly (torch._transformer_encoder_layer_fwd): converted or not, it gives the
    same outputs, and there is no backward to change. With grads on it runs manualbp's layers.

    Args:
        module: an eager (not torch.jit) nn.Module, converted in place.
        fuse: fuse Linear + activation pairs inside nn.Sequential (default True).
        skip: qualified names of submodules to leave as they are, e.g. ("lm_head",).
        report: also return the ConversionReport (default False).
        rule: the learning rule of every converted layer (see manualbp.Linear and
            manualbp.rules; default "backprop"). Each converted layer draws its own `feedback`,
            in named_modules() order, from the torch seed. Direct feedback alignment needs an
            mb.MLP and is refused here.

    Returns:
        module, or (module, ConversionReport) when report=True.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"convert: expected an eager nn.Module, got {type(module).__name__}; "
            "convert before torch.jit.script"
        )
    rule = check_rule(rule, "convert")
    if rule == DFA:
        raise ValueError(
            "convert: rule 'direct_feedback_alignment' needs one network whose hidden layers "
            "all hear the output layer's error; use mb.MLP(sizes, rule='dfa'), or another rule"
        )
    rep = ConversionReport()
    modules = list(module.named_modules())  # each module once, by its first name, parents first
    skip_ids = _skipped_ids(module, skip, rep)
    fusions = _plan_fusions(modules, skip_ids, rep) if fuse else {}
    if rule != "backprop":  # a Conv1D would silently keep backprop's W in the error's way down
        conv = [name for name, m in modules if id(m) not in skip_ids and is_conv1d(m)]
        if conv:
            raise ValueError(
                f"convert: rule {rule!r} is not implemented for Hugging Face Conv1D layers, got "
                f"{len(conv)}: {', '.join(conv[:4])}{', ...' if len(conv) > 4 else ''}; keep "
                "them on backprop with skip=(their names,) or convert with rule='backprop'"
            )
    for name, m in modules:
        if id(m) in skip_ids or isinstance(m, Linear):
            continue
        if type(m) is nn.Linear and _why_weight_unsupported(m) is not None:
            rep.skipped.append((name, _why_weight_unsupported(m)))
        elif type(m) is nn.Linear:
            activation, seq, slot = fusions.get(id(m), ("identity", None, None))
            m.__class__ = Linear  # same object: Parameters, hooks, mode all stay
            m.activation = activation
            attach(m, rule)
            rep.converted.append(name)
            if seq is not None:
                identity = nn.Identity()
                identity.train(seq._modules[slot].training)
                # kept, unregistered (state_dict and named_modules unchanged), for mb.unconvert
                object.__setattr__(identity, UNFUSED, seq._modules[slot])
                seq._modules[slot] = identity
        elif isinstance(m, nn.Linear):
            rep.skipped.append((name, _why_left_alone(m)))
        elif is_conv1d(m):
            why = _why_weight_unsupported(m) or _why_parametrized(m)
            if why is None:
                convert_conv1d(m)
                rep.converted.append(name)
            else:
                rep.skipped.append((name, why))
        elif _looks_linear(m) and not is_converted_conv1d(m):
            rep.skipped.append((name, _why_other_linear(m)))
    if fuse:
        _chain(modules, skip_ids, rep)
    logger.info("%s", rep)
    return (module, rep) if report else module


def _chain(modules: list[tuple[str, nn.Module]], skip_ids: set[int], rep: ConversionReport):
    """Make every plain nn.Sequential holding a run of >= 2 manualbp.Linear a Chain, in place."""
    for name, m in modules:
        if type(m) is nn.Sequential and id(m) not in skip_ids and has_run(m):
            m.__class__ = Chain  # same object: children, hooks, mode all stay
            rep.chained.append(name)


def _skipped_ids(module: nn.Module, skip: Iterable[str], rep: ConversionReport) -> set[int]:
    """ids of the modules under the names in skip; refuse names that are not submodules."""
    if isinstance(skip, str):
        raise TypeError(
            f"convert: expected skip to be a collection of names, got the str {skip!r}; "
            f"write skip=({skip!r},)"
        )
    ids = set()
    for name in skip:
        try:
            sub = module.get_submodule(name)
        except (AttributeError, TypeError):
            raise ValueError(
                f"convert: expected skip to hold names from module.named_modules(), got {name!r}"
            ) from None
        ids.update(id(m) for m in sub.modules())
        rep.skipped.append((name, "listed in skip"))
    return ids


def _plan_fusions(
    modules: list[tuple[str, nn.Module]], skip_ids: set[int], rep: ConversionReport
) -> dict[int, tuple[str, nn.Sequential, str]]:
    """id(linear) -> (activation name, Sequential, slot of the activation) for each safe pair."""
    names = {id(m): name for name, m in modules}
    n_parents = Counter(
        id(child) for _, m in modules for child in m._modules.values() if child is not None
    )
    plan = {}
    for seq_name, seq in modules:
        if not isinstance(seq, nn.Sequential) or (type(seq).forward is not nn.Sequential.forward
                                                  and type(seq) is not Chain):
            continue
        for (_, linear), (act_slot, act) in pairwise(seq._modules.items()):
            if (type(linear) is not nn.Linear or {id(linear), id(act)} & skip_ids
                    or _why_weight_unsupported(linear) is not None):
                continue
            activation, why_not = _match_activation(act)
            if activation is None and why_not is None:
                continue  # not an activation module
            act_name = f"{seq_name}.{act_slot}" if seq_name else act_slot
            linear_name = names[id(linear)]
            why_not = why_not or _why_not_fused(linear_name, linear, act, n_parents[id(linear)])
            if why_not is not None:
                rep.skipped.append((act_name, f"not fused: {why_not}"))
                continue
            plan[id(linear)] = (activation, seq, act_slot)
            rep.fused.append((linear_name, act_name))
    return plan


def _why_not_fused(linear_name: str, linear: nn.Module, act: nn.Module, n_parents: int):
    """Why fusing act into linear would change what the model computes, or None if it would not."""
    if n_parents > 1:
        return f"{linear_name} is reachable by several names; g would reach them all"
    if _has_hooks(linear, ("_forward_hooks", "_backward")):
        return f"{linear_name} has forward/backward hooks, which would see g(z), not z"
    if _has_hooks(act, ("_",)):
        return "it has hooks, which would be lost with the module"
    return None


def _match_activation(act: nn.Module) -> tuple[str | None, str | None]:
    """(manualbp name, None) if act is fusable, (None, why not) if its settings differ,
    (None, None) if it is no activation module that manualbp knows."""
    known = [(name, settings) for kind, name, settings in _FUSABLE if type(act) is kind]
    for name, settings in known:
        if all(getattr(act, key) == value for key, value in settings.items()):
            return name, None
    if not known:
        return None, None
    wanted = " or ".join(
        ", ".join(f"{key}={value!r}" for key, value in settings.items()) for _, settings in known
    )
    return None, f"{act!r} differs from manualbp's g, which needs {wanted}"


def _has_hooks(m: nn.Module, prefixes: tuple[str, ...]) -> bool:
    """Whether m has a non-empty hook dict whose attribute name starts with one of prefixes."""
    return any(
        key.startswith(prefixes) and key.endswith("hooks") and isinstance(hooks, dict) and hooks
        for key, hooks in vars(m).items()
    )


def _why_weight_unsupported(m: nn.Module) -> str | None:
    """Why the hand-written backward cannot serve m's weight (complex, integer, sparse), or None."""
    W = m.weight
    if W.is_complex():
        return (f"complex weight ({W.dtype}): the hand-written backward is real-valued (no "
                "conjugates), so autograd keeps it")
    if not W.is_floating_point():
        return f"weight of dtype {W.dtype} is not floating point"
    if W.layout != torch.strided:
        return f"{str(W.layout).removeprefix('torch.')} weight: the backward forms dense gradients"
    return None


def _why_parametrized(m: nn.Module) -> str | None:
    if hasattr(m, "parametrizations"):
        return f"{type(m).__name__} is parametrized; its weight is computed by parametrize"
    return None


def _looks_linear(m: nn.Module) -> bool:
    """A module that is not converted but that a user would call a linear layer."""
    kind = type(m).__name__
    return (any(word in kind for word in ("Linear", "Conv1D", "Dense"))
            and not kind.endswith("PackedParams") and not isinstance(m, Linear))


def _why_other_linear(m: nn.Module) -> str:
    kind = type(m).__name__
    if kind == "Conv1D":
        return why_conv1d_misfits(m)
    if type(m).__module__.startswith("torch.ao.") or "quantized" in type(m).__module__:
        return f"{kind} is a quantized layer (packed weights, no backward to replace)"
    return (f"{kind} ({type(m).__module__}) is not an nn.Linear nor a Conv1D: its forward is its "
            "own, left to autograd")


def _why_left_alone(linear: nn.Linear) -> str:
    """The reason a Linear subclass is not converted, for the report."""
    kind = type(linear).__name__
    if isinstance(linear, NonDynamicallyQuantizableLinear):
        return (
            f"{kind} (nn.MultiheadAttention's out_proj): F.multi_head_attention_forward reads its "
            "weight directly, so its forward never runs"
        )
    if isinstance(linear, nn.LazyLinear):
        return f"{kind} is not initialised yet; run one forward first (it then becomes nn.Linear)"
    if hasattr(linear, "parametrizations"):
        return f"{kind} is parametrized; its weight is computed by torch.nn.utils.parametrize"
    return f"{kind} subclasses nn.Linear with behaviour of its own"
