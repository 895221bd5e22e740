"""How far a learning rule's error is from backprop's, and how its feedback matrix aligns.

Every N training steps under a rule other than backprop, per layer i (1 = first hidden layer):

    align/delta_angle_{i}   angle (degrees) between the rule's delta[i] on the batch and the
                            delta[i] backprop's recursion through W would have sent, both
                            computed in the same backward pass (hidden layers: the output
                            layer's delta is the loss's under every rule)
    align/BW_angle_{i}      angle (degrees) between the layer's feedback B[i] and W[i]
    align/BW_norm_ratio_{i} ||B[i]|| / ||W[i]||

(B and W are compared as flat vectors; DFA's D[i] has another shape than W and has only the
delta angle.) Under feedback alignment B is fixed, yet the delta angle falls well below 90
degrees as training goes on: W comes to align with B (Lillicrap et al., 2016). Kolen-Pollack's
B-W angle goes to 0 (B and W get the same update, and weight decay forgets where they began);
sign symmetry's stays where sign(W) puts it.
"""

import math

import lightning as L
from torch import Tensor

import manualbp as mb


def angle(u: Tensor, v: Tensor) -> float:
    """The angle between u and v as flat vectors, in degrees (90 if either is zero)."""
    u, v = u.detach().double().flatten(), v.detach().double().flatten()
    norms = u.norm() * v.norm()
    if norms == 0:
        return 90.0
    cos = (u @ v / norms).clamp(-1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def alignment_metrics(layers, trace: mb.Trace) -> dict[str, float]:
    """The align/ scalars above from the network's layers and a Trace filled under a rule."""
    metrics: dict[str, float] = {}
    L = len(layers)
    for i, (delta, bp) in enumerate(zip(trace.delta, trace.delta_backprop, strict=False), start=1):
        if i < L and delta is not None and bp is not None:
            metrics[f"align/delta_angle_{i}"] = angle(delta, bp)
    for i, layer in enumerate(layers, start=1):
        B = getattr(layer, "feedback", None)
        W = layer.weight
        if B is None or B.shape != W.shape:
            continue
        metrics[f"align/BW_angle_{i}"] = angle(B, W)
        metrics[f"align/BW_norm_ratio_{i}"] = (B.detach().norm() / W.detach().norm()).item()
    return metrics


class RuleAlignment(L.Callback):
    """Logs the align/ scalars every `every_n_steps` steps; does nothing under backprop.

    Shares the step's mb.Trace with LayerStatsMonitor when both are due (manual backend only;
    global rank zero records and logs).

    Args:
        every_n_steps: steps between logs; None uses the Trainer's log_every_n_steps.
            Default: None.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._trace: mb.Trace | None = None

    def _active(self, trainer, pl_module) -> bool:
        if getattr(pl_module, "rule", "backprop") == "backprop" or not trainer.loggers:
            return False
        every = self.every_n_steps or trainer.log_every_n_steps
        return trainer.is_global_zero and trainer.global_step % every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._active(trainer, pl_module) and pl_module.trace is None:
            pl_module.trace = mb.Trace()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the Trace the forward ran with (another callback may have set its own)
        self._trace = pl_module.trace if self._active(trainer, pl_module) else None

    def on_after_backward(self, trainer, pl_module) -> None:
        trace, self._trace = self._trace, None
        if trace is None:
            return
        pl_module.trace = None
        metrics = alignment_metrics(pl_module.linear_layers(), trace)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
