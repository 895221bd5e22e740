"""Per-layer gradient and delta statistics: vanishing gradients made visible.

Every logging step, for each layer i = 1..L:

    grad_norm/W{i}       ||grad_W[i]||  (Frobenius norm of dL/dW[i] for the current batch)
    delta/mean_abs_{i}   mean |delta[i]|, delta[i] = dL/dz[i]

In a deep sigmoid net g' <= 1/4 shrinks delta at every layer on the way down, so the first
layers' curves sit orders of magnitude below the last; with ReLU (g' = 1 where active) they
stay close. Every `histogram_every_n_steps` it also writes histograms of W[i], grad_W[i],
a[i] and delta[i].
"""

import lightning as L
import torch

import manualbp as mb
from manualbp.lit.tb_logger import tensorboard_logger


class LayerStatsMonitor(L.Callback):
    """Logs grad_norm/W{i} and delta/mean_abs_{i} per layer, and histograms now and then.

    The deltas come from an mb.Trace the LightningModule fills during the training step: the
    hand-written backward records them (manual backend), or tensor hooks on each nn.Linear
    output z catch them (autograd backend). Only global rank zero records and logs.

    Args:
        every_n_steps: steps between scalar logs; None uses the Trainer's log_every_n_steps.
            Default: None.
        histogram_every_n_steps: steps between histograms; 0 turns them off. Default: 100.
    """

    def __init__(self, every_n_steps: int | None = None, histogram_every_n_steps: int = 100):
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps

    def _due(self, trainer: L.Trainer) -> tuple[bool, bool]:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        hist = self.histogram_every_n_steps
        return step % every == 0, hist > 0 and step % hist == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and any(self._due(trainer)) and trainer.loggers:
            pl_module.trace = mb.Trace()

    def on_after_backward(self, trainer, pl_module) -> None:
        trace, pl_module.trace = pl_module.trace, None
        if trace is None:
            return
        scalars_due, histograms_due = self._due(trainer)
        step = trainer.global_step
        layers = pl_module.linear_layers()
        if scalars_due:
            metrics = {}
            for i, (layer, delta) in enumerate(zip(layers, trace.delta, strict=True), start=1):
                if layer.weight.grad is not None:
                    metrics[f"grad_norm/W{i}"] = layer.weight.grad.norm().item()
                if delta is not None:
                    metrics[f"delta/mean_abs_{i}"] = delta.abs().mean().item()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        tb = tensorboard_logger(trainer)
        if histograms_due and tb is not None:
            writer = tb.experiment
            for i, layer in enumerate(layers, start=1):
                writer.add_histogram(f"weights/W{i}", _host(layer.weight), step)
                if layer.weight.grad is not None:
                    writer.add_histogram(f"gradients/W{i}", _host(layer.weight.grad), step)
            for i, (a, delta) in enumerate(zip(trace.a, trace.delta, strict=True), start=1):
                writer.add_histogram(f"activations/a{i}", _host(a), step)
                if delta is not None:
                    writer.add_histogram(f"deltas/delta{i}", _host(delta), step)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy: TensorBoard's histogram wants numpy, which has no bfloat16."""
    return t.detach().float().cpu()
