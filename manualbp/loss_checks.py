"""Input checks for the losses: one clear error at the public entry point, never deep inside."""

import operator

import torch
from torch import Tensor

from manualbp.apply import tracing

_REDUCTIONS = ("mean", "sum", "none")


def _check_common(where: str, input: object, target: object, reduction: object) -> None:
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        got = type(input if not isinstance(input, Tensor) else target).__name__
        raise TypeError(f"{where}: expected input and target to be torch.Tensor, got {got}")
    for name, t in (("input", input), ("target", target)):
        if t.layout != torch.strided or t.is_nested:
            kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
            raise TypeError(
                f"{where}: expected a dense (strided) {name}, got a {kind} tensor; "
                f"pass {name}.to_dense()"
            )
    if not input.is_floating_point():
        raise TypeError(
            f"{where}: expected floating-point input (logits), got dtype {input.dtype}"
            + ("; the hand-written derivatives are real-valued" if input.is_complex() else "")
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")


def check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                        full: bool = False):
    """Validate, then flatten to (m, C) logits and (m,) or (m, C) targets.

    Class-index values are not scanned here (a reduction and a host read per call, a device
    sync on CUDA): the loss kernel refuses a bad one, then explain_class_indices names it.
    The usual call's checks are fewer (plain_cross_entropy); full=True runs them all (once the
    kernel has refused, or where the usual call's say no). Returns (z, target, shape of the
    'none' result).
    """
    if not full and plain_cross_entropy(input, target, weight, reduction, label_smoothing):
        return input, target, target.shape  # (N, C) logits, (N,) indices: nothing to reshape
    where = "softmax_cross_entropy"
    _check_common(where, input, target, reduction)
    if input.dim() == 0:
        raise ValueError(f"{where}: expected input of shape (N, C) or (C,), got a 0-dim tensor")
    _check_ignore_index(where, ignore_index)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{where}: expected label_smoothing in [0, 1], got {label_smoothing}")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None and (not isinstance(weight, Tensor) or weight.shape != (C,)):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{where}: expected weight of shape (C,)=({C},), got {got}")
    if weight is not None and weight.requires_grad:
        raise ValueError(f"{where}: weight must not require grad; pass weight.detach()")
    if (weight is not None and weight.dtype != input.dtype
            and not torch.is_autocast_enabled(input.device.type)):  # autocast: the loss casts it
        raise TypeError(
            f"{where}: expected weight of the input's dtype {input.dtype}, got {weight.dtype}; "
            f"pass weight.to({input.dtype})"
        )
    probs = target.is_floating_point()
    if not probs:
        _check_index_dtype(where, target)
    if target.dtype == torch.uint8:
        target = target.long()  # torch takes Byte targets too; indexing needs int64
    if probs:
        if target.shape != input.shape:
            raise ValueError(
                f"{where}: expected probability target of the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
    else:
        want = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if target.shape != want:
            raise ValueError(
                f"{where}: expected class-index target of shape {tuple(want)} for input "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
    if input.dim() == 1:  # unbatched (C,)
        z, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() > 2:  # (N, C, d1, ...): every position is an example
        z = input.movedim(1, -1).reshape(-1, C)
        target = target.movedim(1, -1).reshape(-1, C) if probs else target.reshape(-1)
    else:
        z = input
    if probs:  # else the 'none' result has the class-index target's shape, want
        want = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    return z, target, want


def _check_ignore_index(where: str, ignore_index: object) -> None:
    """Refuse an ignore_index the loss kernel cannot take (it wants a 64-bit int), naming it."""
    try:
        value = None if isinstance(ignore_index, bool) else operator.index(ignore_index)
    except TypeError:
        value = None
    if value is None or not -2**63 <= value < 2**63:
        raise TypeError(
            f"{where}: expected ignore_index to be a 64-bit int (the class index to leave out, "
            f"default -100), got {ignore_index!r} ({type(ignore_index).__name__})"
        )


_INT64 = torch.int64
_FLOAT32_64 = (torch.float32, torch.float64)
_STRIDED = torch.strided


def plain_cross_entropy(input, target, weight, reduction, label_smoothing) -> bool:
    """Whether check_cross_entropy would pass, and flatten and cast nothing, for the usual call:
    (N, C) dense float32/float64 logits, (N,) int64 class indices, no weight, no smoothing; read
    in ~0.5 us, not the checks' ~2 us. One check is left to the loss kernel, which refuses it
    (RuntimeError: softmax_cross_entropy then runs the checks, which say what is wrong):
    len(target) == N. False sends the call through every check."""
    return (weight is None and type(label_smoothing) is float and label_smoothing == 0.0
            and isinstance(input, Tensor) and isinstance(target, Tensor)
            and input.dim() == 2 and target.dim() == 1 and target.dtype is _INT64
            and input.dtype in _FLOAT32_64 and input.layout is _STRIDED
            and target.layout is _STRIDED and not input.is_nested and not target.is_nested
            and reduction in _REDUCTIONS)


def explain_class_indices(where: str, target: Tensor, C: int, ignore_index: int | None) -> None:
    """Raise naming the first class index outside [0, C) that is not ignore_index.

    Called once the loss kernel has refused the target, to say which index and why.
    """
    if tracing() or target.numel() == 0:
        return  # no data-dependent checks inside a graph or vmap
    bad = (target < 0) | (target >= C)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        value = int(target[i])
        what = "negative" if value < 0 else f"out of range for C={C} classes"
        skip = "" if ignore_index is None else f", or ignore_index={ignore_index} to skip it"
        raise ValueError(
            f"{where}: class index {value} at target[{i}] (flattened) is {what}; expected "
            f"0 <= index < {C}{skip}"
        )


def check_bce(input, target, weight, reduction, pos_weight) -> None:
    where = "sigmoid_binary_cross_entropy"
    _check_common(where, input, target, reduction)
    if target.shape != input.shape:
        raise ValueError(
            f"{where}: expected target of the input's shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if not target.is_floating_point():
        raise TypeError(
            f"{where}: expected floating-point targets in [0, 1], got dtype {target.dtype}; "
            "use target.float()"
        )
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        if t.requires_grad:
            raise ValueError(f"{where}: {name} must not require grad; pass {name}.detach()")
        try:
            ok = torch.broadcast_shapes(t.shape, input.shape) == input.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: expected {name} broadcastable to the input's shape "
                f"{tuple(input.shape)}, got {tuple(t.shape)}"
            )


def check_mse(input, target, reduction) -> None:
    where = "mse_loss"
    _check_common(where, input, target, reduction)
    if target.shape != input.shape:
        raise ValueError(
            f"mse_loss: expected target of the input's shape {tuple(input.shape)}, got "
            f"{tuple(target.shape)}; reshape one of them (broadcasting here is almost always a bug)"
        )


def _check_index_dtype(where: str, target: Tensor) -> None:
    """Class indices of a dtype the loss kernel takes (nll_loss: int64 or uint8, no other)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            f"{where}: expected class indices of dtype torch.int64 (or torch.uint8), got "
            f"{target.dtype}; pass target.long()"
        )


def check_mlp_target(x: Tensor, target: object, where: str = "MLP.loss") -> Tensor:
    """Class indices for MLP.loss: integer, of shape x.shape[:-1] (values: explain_mlp_target)."""
    if not isinstance(target, Tensor) or target.is_floating_point():
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(
            f"{where}: expected integer class indices as target, got {got}; for class "
            "probabilities use softmax_cross_entropy(mlp(x), target)"
        )
    _check_index_dtype(where, target)
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"{where}: expected target of shape {tuple(x.shape[:-1])} for input "
            f"{tuple(x.shape)}, got {tuple(target.shape)}"
        )
    return target


def explain_mlp_target(where: str, target: Tensor, C: int) -> None:
    """Raise naming the first class index outside [0, C) that is not the ignored -100.

    Called once the loss kernel has refused the target: checking every batch up front costs a
    reduction and a host read per step (a device sync on CUDA).
    """
    explain_class_indices(where, target.reshape(-1), C, ignore_index=-100)
