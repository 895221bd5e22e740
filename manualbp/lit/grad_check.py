"""A live check of the hand-written backward against autograd, on the batch being trained.

Every N steps the batch's gradients are computed a second time, by autograd through a
functional copy of the network (F.linear and torch's own g for every layer, torch's loss), with
the same weights and the same batch. The largest relative difference over all parameters,

    check/grad_rel_err = max_p  max|grad_p - ref_p| / max|ref_p|,

is logged. In float32 it sits near 1e-6; anything near 1 means the backward is wrong.
"""

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp as mb
from manualbp.lit.heads import head_loss

log = logging.getLogger(__name__)


def reference_grads(layers, activations: list[str], head: str, x: Tensor, y: Tensor):
    """Autograd's gradients of the mean loss w.r.t. each W[i] and b[i], in layer order.

    Args:
        layers: the L linear layers (weight (n_i, n_{i-1}), bias (n_i,) or None).
        activations: activation name of each layer; the last is "identity".
        head: the output head ("softmax", "logistic" or "identity").
        x, y: the batch, x (N, n_0).
    """
    params = [p.detach().requires_grad_() for layer in layers
              for p in (layer.weight, layer.bias) if p is not None]
    it = iter(params)
    a = x
    for layer, name in zip(layers, activations, strict=True):
        W = next(it)
        b = next(it) if layer.bias is not None else None
        a = mb.ACTIVATIONS[name].g(F.linear(a, W, b))  # a[i] = g(z[i])
    loss = head_loss(head, a, y, manual=False)
    return torch.autograd.grad(loss, params)


def max_relative_error(grads, refs) -> float:
    """max over tensors of max|g - ref| / max|ref| (a tiny floor keeps 0/0 at 0)."""
    errs = [(g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)
            for g, r in zip(grads, refs, strict=True)]
    return torch.stack(errs).max().item()


class GradCheck(L.Callback):
    """Every `every_n_steps` logs check/grad_rel_err between the trained grads and autograd's.

    Under DDP the trained gradients are averaged over ranks, so the reference is averaged the
    same way (every rank takes part). Skipped when gradients accumulate over several batches.

    Args:
        every_n_steps: steps between checks; 0 turns the check off. Default: 50.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        every = self.every_n_steps
        if getattr(pl_module, "rule", "backprop") != "backprop":
            return  # the reference is backprop's; RuleAlignment pictures how a rule differs
        if every > 0 and trainer.global_step % every == 0 and trainer.accumulate_grad_batches == 1:
            self._batch = batch

    def on_after_backward(self, trainer, pl_module) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        layers = pl_module.linear_layers()
        grads = [p.grad for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        if any(g is None for g in grads):
            return
        x, y = batch
        with trainer.precision_plugin.forward_context():
            refs = reference_grads(layers, pl_module.activations, pl_module.head, x, y)
        refs = [trainer.strategy.reduce(r, reduce_op="mean") for r in refs]
        err = max_relative_error(grads, refs)
        for logger in trainer.loggers:
            logger.log_metrics({"check/grad_rel_err": err}, step=trainer.global_step)
        if err > 1e-2 and trainer.precision_plugin.precision in ("32-true", "64-true"):
            log.warning("hand-written gradients differ from autograd's by %.3g at step %d",
                        err, trainer.global_step)
