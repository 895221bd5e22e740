"""Output heads: how the last layer's z[L] becomes a loss, a prediction and class probabilities.

The network's last layer is linear (identity g), so its output is z[L]. The head supplies the
output nonlinearity together with its loss, the pairing whose delta[L] is yhat - y:

    softmax   + cross-entropy         multiclass        C outputs
    logistic  + binary cross-entropy  two classes       1 output
    identity  + mean squared error    regression        as many outputs as targets

The manual backend uses manualbp's losses (hand-written backward); the autograd backend and the
live gradient check use torch's own, so the two can be compared.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp as mb

HEADS = ("softmax", "logistic", "identity")
_AUTO = {"multiclass": "softmax", "binary": "logistic", "regression": "identity"}


def resolve_head(head: str, task: str, num_classes: int) -> str:
    """The head to use for a data set's task; "auto" picks the task's natural one.

    Args:
        head: "auto" or one of HEADS.
        task: "multiclass", "binary" or "regression" (from the datamodule).
        num_classes: classes in the data (targets for regression).
    """
    if task not in _AUTO:
        raise ValueError(f"head: expected task in {tuple(_AUTO)}, got {task!r}")
    if head == "auto":
        return _AUTO[task]
    if head not in HEADS:
        raise ValueError(f"model.head: expected 'auto' or one of {HEADS}, got {head!r}")
    if (head == "identity") != (task == "regression"):
        raise ValueError(
            f"model.head: head {head!r} does not fit task {task!r}; identity is for regression, "
            "softmax and logistic are for classification; use model.head=auto"
        )
    if head == "logistic" and num_classes != 2:
        raise ValueError(
            f"model.head: logistic needs exactly 2 classes, got {num_classes}; use softmax"
        )
    return head


def out_units(head: str, num_classes: int) -> int:
    """Width of the last layer: 1 for a logistic head, else one per class (or target)."""
    return 1 if head == "logistic" else num_classes


def head_loss(head: str, logits: Tensor, y: Tensor, manual: bool) -> Tensor:
    """Mean loss of z[L] = logits against targets y; manualbp's loss if manual, else torch's.

    Shapes: logits (N, C) with y (N,) int64 for softmax; logits (N, 1) with y (N,) of 0/1 for
    logistic; logits and y (N, T) for identity.
    """
    if head == "softmax":
        loss_fn = mb.softmax_cross_entropy if manual else F.cross_entropy
        return loss_fn(logits, y)
    if head == "logistic":
        target = y.reshape(logits.shape).to(logits.dtype)  # class index 0/1 -> probability
        loss_fn = mb.sigmoid_binary_cross_entropy if manual else F.binary_cross_entropy_with_logits
        return loss_fn(logits, target)
    loss_fn = mb.mse_loss if manual else F.mse_loss
    return loss_fn(logits, y.to(logits.dtype))


def head_preds(head: str, logits: Tensor) -> Tensor:
    """Predicted class indices (N,) for classification heads; the outputs for regression."""
    if head == "softmax":
        return logits.argmax(dim=-1)
    if head == "logistic":
        return (logits[..., 0] > 0).long()  # sigmoid(z) > 1/2  <=>  z > 0
    return logits


def head_probs(head: str, logits: Tensor) -> Tensor:
    """Class probabilities (N, C) (two columns for a logistic head); the outputs for regression."""
    if head == "softmax":
        return torch.softmax(logits, dim=-1)
    if head == "logistic":
        p = torch.sigmoid(logits)  # (N, 1): P(class 1)
        return torch.cat([1 - p, p], dim=-1)  # (N, 2)
    return logits
