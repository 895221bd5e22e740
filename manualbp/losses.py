"""Output layers with their delta written by hand: delta_L = yhat - y.

With a softmax output and cross-entropy (or a logistic output and binary cross-entropy, or an
identity output and squared error) the output layer's delta collapses to yhat - y. Each Function
below returns that, scaled by what the reduction does (1/m for "mean": the slides' 1/m lives
here) and by the upstream gradient. Forward values are torch's own F.* losses, so they match
bit for bit; only the derivatives are ours.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp.apply import _any_autocast, apply, forward_mode, tracing, with_jvp
from manualbp.loss_checks import (
    check_bce,
    check_cross_entropy,
    check_mse,
    explain_class_indices,
    plain_cross_entropy,
)
from manualbp.native import eager as _native
from manualbp.native import lib as _native_lib


def _scale(grad: Tensor, reduction: str, denom) -> Tensor:
    """What each example's delta is multiplied by: upstream grad, over m for 'mean'."""
    if reduction == "none":
        return grad.unsqueeze(-1) if grad.dim() else grad
    return grad / denom if reduction == "mean" else grad


def _reduce(d: Tensor, reduction: str) -> Tensor:
    """An elementwise loss tangent reduced as the loss was."""
    if reduction == "none":
        return d
    return d.mean() if reduction == "mean" else d.sum()


@with_jvp
class SoftmaxCrossEntropyFunction(Function):
    """L = -sum_c t_c log softmax(z)_c per row; delta_L = (sum_c t_c) softmax(z) - t.

    t is the target row: one-hot (scaled by the class weight, mixed with eps/C when label
    smoothing) for class indices, or the given probabilities. Plain one-hot gives yhat - y.
    z: (m, C); target: (m,) int64 or (m, C) float. Returns (loss, log yhat, count): log yhat is
    an output so that backward reads yhat = exp(log yhat) off it (a softmax costs more on CPU);
    count (class indices, no smoothing: the loss kernel's total weight of the rows it kept) tells
    backward, with no scan of the targets, whether any row was ignored.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, target, weight, ignore_index, reduction, label_smoothing):
        log_yhat = torch.log_softmax(z, 1)
        # The value is torch's own (bit for bit: F.nll_loss runs this kernel); the derivative
        # below is ours. The kernel refuses a class index outside [0, C) (IndexError).
        if label_smoothing == 0 and not target.is_floating_point():
            loss, count = torch.ops.aten.nll_loss_forward(log_yhat, target, weight,
                                                          _REDUCTION_CODE[reduction], ignore_index)
        else:
            loss = F.cross_entropy(z, target, weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing)
            count = None
        return loss, log_yhat, count

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, target, weight, *options = inputs
        ctx.options = options
        ctx.set_materialize_grads(False)
        if output[2] is not None:
            ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(target, weight, output[1], output[2])
        if forward_mode():
            ctx.save_for_forward(target, weight, output[1], output[2])

    @staticmethod
    def _jvp(ctx, dz, d_target, *_):
        """Forward mode: each row's dL = delta_row . dz, delta_row = (sum_c t_c) yhat - t as in
        backward (plus dL/dt . dt for probability targets), reduced like the loss."""
        target, weight, log_yhat, _count = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        yhat = torch.exp(log_yhat)
        if dz is None:
            dz = torch.zeros_like(log_yhat)
        t, denom, valid = _target_rows(log_yhat, target, weight, ignore_index, label_smoothing)
        delta = t.sum(1, keepdim=True) * yhat - t
        d_rows = (delta * dz).sum(1)  # (m,)
        if d_target is not None:  # probability targets
            w = 1.0 if weight is None else weight
            d_rows = d_rows - ((1 - label_smoothing) * w * log_yhat * d_target).sum(1)
        if valid is not None:
            d_rows = torch.where(valid, d_rows, 0.0)
        d_loss = d_rows if reduction == "none" else d_rows.sum()
        if reduction == "mean":
            d_loss = d_loss / denom
        d_log_yhat = dz - (yhat * dz).sum(1, keepdim=True)
        return d_loss, d_log_yhat, None

    @staticmethod
    def backward(ctx, grad, grad_log_yhat, _grad_count):
        target, weight, log_yhat, count = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        grad_z = grad_target = None
        yhat = None if count is not None and grad_log_yhat is None else torch.exp(log_yhat)
        if grad is not None and count is not None:  # class indices, no smoothing
            grad_z = class_index_delta(grad, log_yhat, target, weight, reduction, ignore_index,
                                       count)
        elif grad is not None:
            t, denom, valid = _target_rows(log_yhat, target, weight, ignore_index, label_smoothing)
            scale = _scale(grad, reduction, denom)
            grad_z = (t.sum(1, keepdim=True) * yhat - t) * scale
            if valid is not None and reduction == "mean":
                # An ignored row contributes nothing, even when every row is ignored and the
                # mean's denominator is 0 (torch's gradient is then 0, not 0 * inf = NaN).
                grad_z = torch.where(valid[:, None], grad_z, 0.0)
            if ctx.needs_input_grad[1]:  # probability targets: dL/dt = -(1-eps) w log yhat
                w = 1.0 if weight is None else weight
                grad_target = -(1 - label_smoothing) * w * log_yhat * scale
        if grad_log_yhat is not None:  # only double backward reaches log yhat
            g = grad_log_yhat - yhat * grad_log_yhat.sum(1, keepdim=True)
            grad_z = g if grad_z is None else grad_z + g
        return grad_z, grad_target, None, None, None, None


_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction, as nll_loss_forward takes it
_HALF = (torch.float16, torch.bfloat16)


def class_index_delta(grad, log_yhat, target, weight, reduction: str, ignore_index: int,
                      count) -> Tensor:
    """delta_L = w_y (yhat - y) * grad / count for class-index targets, in the loss kernels' own
    two steps (backprop.softmax_ce_delta's, with every option): nll_loss_backward puts
    -w_y grad / count at each row's target (0 on an ignored row, so all rows ignored give 0),
    then log-softmax's backward adds yhat times that row's total, w_y grad / count. count: the
    forward kernel's total weight of the rows it kept."""
    minus_y = torch.ops.aten.nll_loss_backward(grad, log_yhat, target, weight,
                                               _REDUCTION_CODE[reduction], ignore_index, count)
    return torch._log_softmax_backward_data(minus_y, log_yhat, 1, log_yhat.dtype)


def _target_rows(log_yhat, target, weight, ignore_index, label_smoothing):
    """(target rows t, the 'mean' denominator as torch's, the rows not ignored or None when
    none can be)."""
    m, C = log_yhat.shape
    if target.is_floating_point():  # class probabilities
        t = target if label_smoothing == 0 else target * (1 - label_smoothing) + label_smoothing / C
        return (t if weight is None else t * weight), m, None
    valid = target != ignore_index
    y = target.masked_fill(~valid, 0)
    w = torch.ones(C, dtype=log_yhat.dtype, device=log_yhat.device) if weight is None else weight
    w_y = w[y] * valid  # (m,) weight of each row's class, 0 where ignored
    t = torch.zeros_like(log_yhat).scatter(1, y[:, None], ((1 - label_smoothing) * w_y)[:, None])
    if label_smoothing:
        t = t + (label_smoothing / C) * w * valid[:, None]
    return t, w_y.sum(), valid


def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax output + cross-entropy, as F.cross_entropy, with delta_L = yhat - y by hand.

    Args:
        input: logits z, (N, C), (C,) or (N, C, d1, ...).
        target: class indices (N,) / (N, d1, ...) in [0, C), or class probabilities shaped
            like input.
        weight: (C,) per-class weights, or None.
        ignore_index: class-index targets equal to it contribute nothing (default -100).
        reduction: "mean" (over examples, weighted as torch does), "sum" or "none".
        label_smoothing: eps in [0, 1]: targets become (1 - eps) y + eps / C.
    """
    if (weight is None and type(label_smoothing) is float and label_smoothing == 0.0
            and not _any_autocast() and not tracing()):  # the usual call, checked in C++
        lib = _native_lib()
        if lib is not None:
            try:  # None: not the usual call (shapes, dtypes, layouts), for the checks below
                loss = lib.softmax_ce_plain(input, target, ignore_index, reduction)
            except (IndexError, RuntimeError, TypeError):  # refused (TypeError: an argument
                # the binding cannot take, such as reduction=None): again below, which says why
                loss = None
            if loss is not None:
                return loss
    given = target  # the checks below see it as given, if the kernel refuses
    if plain_cross_entropy(input, target, weight, reduction, label_smoothing):
        z, shape = input, None  # float32/64 (N, C), int64 (N,): nothing to flatten or cast
    else:
        z, target, shape = check_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, full=True)
        if z.dtype in _HALF and torch.is_autocast_enabled(z.device.type):
            z = z.float()  # autocast runs losses in float32, as it does for F.cross_entropy
            target = target.float() if target.is_floating_point() else target
        if weight is not None and weight.dtype != z.dtype:  # only under autocast (checked)
            weight = weight.to(z.dtype)
    lib = _native(z)  # the C++ twin, for plain eager float32/float64 calls
    args = (z, target, weight, ignore_index, reduction, float(label_smoothing))
    try:
        loss = (lib.softmax_cross_entropy(*args) if lib is not None else apply(
            SoftmaxCrossEntropyFunction, *args))[0]
    except (IndexError, RuntimeError, TypeError) as error:  # the loss kernel (or the C++
        refused = error  # binding, TypeError) refused: say why below
    else:
        return loss if shape is None or reduction != "none" else loss.reshape(shape)
    # every check, with those the usual call leaves to the kernel (the target's length)
    check_cross_entropy(input, given, weight, ignore_index, reduction, label_smoothing,
                        full=True)
    if isinstance(refused, IndexError):  # a class index: say which, and why
        explain_class_indices("softmax_cross_entropy", target, z.shape[1], ignore_index)
    raise refused  # the input was fine: the error is about something else


@with_jvp
class SigmoidBCEFunction(Function):
    """L = -w [p y log sigma(z) + (1 - y) log(1 - sigma(z))].

    delta_L = w ((1 + (p - 1) y) yhat - p y), yhat = sigma(z).

    With no weights (w = p = 1) that is sigma(z) - y = yhat - y. Computed with softplus so large
    |z| never overflows: -log sigma(z) = softplus(-z), -log(1 - sigma(z)) = softplus(z).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, y, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(z, y, weight, reduction=reduction,
                                                  pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, y, weight, pos_weight, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(z, y, weight, pos_weight)
        if forward_mode():
            ctx.save_for_forward(z, y, weight, pos_weight)

    @staticmethod
    def _jvp(ctx, dz, dy, *_):
        """Forward mode: dL = w (delta_L dz + dL/dy dy) per element, reduced like the loss."""
        z, y, weight, pos_weight = ctx.saved_tensors
        d = torch.zeros_like(z)
        if dz is not None:
            yhat = torch.sigmoid(z)
            if pos_weight is None:
                d = (yhat - y) * dz
            else:
                d = ((1 + (pos_weight - 1) * y) * yhat - pos_weight * y) * dz
        if dy is not None:
            p = 1.0 if pos_weight is None else pos_weight
            d = d + (p * F.softplus(-z) - F.softplus(z)) * dy
        if weight is not None:
            d = d * weight
        return _reduce(d, ctx.reduction)

    @staticmethod
    def backward(ctx, grad):
        z, y, weight, pos_weight = ctx.saved_tensors
        scale = grad if ctx.reduction != "mean" else grad / z.numel()
        w = scale if weight is None else weight * scale
        grad_z = grad_y = None
        if ctx.needs_input_grad[0]:
            yhat = torch.sigmoid(z)
            if pos_weight is None:
                delta_L = yhat - y
            else:
                delta_L = (1 + (pos_weight - 1) * y) * yhat - pos_weight * y
            grad_z = delta_L * w
        if ctx.needs_input_grad[1]:  # dL/dy = -w [p log sigma(z) - log(1 - sigma(z))]
            p = 1.0 if pos_weight is None else pos_weight
            grad_y = (p * F.softplus(-z) - F.softplus(z)) * w
        return grad_z, grad_y, None, None, None


def sigmoid_binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Logistic output + binary cross-entropy, as F.binary_cross_entropy_with_logits.

    Args:
        input: logits z, any shape. target: probabilities y in [0, 1], same shape.
        weight: rescales each element's loss; broadcast to input's shape.
        reduction: "mean" (over all elements), "sum" or "none".
        pos_weight: weight of the positive term, broadcast along the last (class) dim.
    """
    check_bce(input, target, weight, reduction, pos_weight)
    if torch.is_autocast_enabled(input.device.type) and input.dtype != torch.float64:
        input, target = input.float(), target.float()
    lib = _native(input)
    if lib is not None:
        return lib.sigmoid_binary_cross_entropy(input, target, weight, pos_weight, reduction)
    return apply(SigmoidBCEFunction, input, target, weight, pos_weight, reduction)


@with_jvp
class MSEFunction(Function):
    """L = (yhat - y)^2 with an identity output; delta_L = 2 (yhat - y), over m for 'mean'."""

    generate_vmap_rule = True

    @staticmethod
    def forward(yhat, y, reduction):
        return F.mse_loss(yhat, y, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        yhat, y, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(yhat, y)
        if forward_mode():
            ctx.save_for_forward(yhat, y)

    @staticmethod
    def _jvp(ctx, d_yhat, d_y, _):
        """Forward mode: dL = 2 (yhat - y) (dyhat - dy) per element, reduced like the loss."""
        yhat, y = ctx.saved_tensors
        d = torch.zeros_like(yhat) if d_yhat is None else d_yhat
        if d_y is not None:
            d = d - d_y
        return _reduce(2 * (yhat - y) * d, ctx.reduction)

    @staticmethod
    def backward(ctx, grad):
        yhat, y = ctx.saved_tensors
        scale = grad if ctx.reduction != "mean" else grad / yhat.numel()
        delta_L = 2 * (yhat - y) * scale
        return (
            delta_L if ctx.needs_input_grad[0] else None,
            -delta_L if ctx.needs_input_grad[1] else None,
            None,
        )


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Identity output + squared error, as F.mse_loss (but shapes must match exactly).

    Args:
        input: predictions yhat, any shape. target: y, the same shape.
        reduction: "mean" (over all elements), "sum" or "none".
    """
    check_mse(input, target, reduction)
    if torch.is_autocast_enabled(input.device.type) and input.dtype != torch.float64:
        input, target = input.float(), target.float()
    lib = _native(input)
    if lib is not None:
        return lib.mse_loss(input, target, reduction)
    return apply(MSEFunction, input, target, reduction)
