"""Per-example gradient norms and the gradient noise scale, from the step's own backward.

Every N steps the training step runs inside mb.per_example(net) (norms only: .grad is the
plain batch gradient), which gives each example's gradient norm ||g_n|| at no extra pass.
With G the batch gradient (the mean of the g_n) and B the batch size:

    tr(Sigma) ~ S   = B / (B - 1) (mean_n ||g_n||^2 - ||G||^2)   per-example variance
    |G_true|^2 ~ G2 = ||G||^2 - S / B                    (unbiased: E||G||^2 = |G|^2 + tr / B)
    B_simple        = S / G2                                     (McCandlish et al. 2018)

Logged: the histogram per_example/grad_norm and the scalar per_example/noise_scale (B_simple,
when G2 > 0). B_simple is the batch size past which a larger batch buys little: well below the
batch size, the step is mostly signal; well above it, mostly noise. Under DP-SGD (dp=sgd) only
the histogram is logged, of the norms before clipping: where it sits against dp.max_norm says
how many examples the clip cuts.
"""

import lightning as L
import torch

import manualbp as mb
from manualbp.lit.tb_logger import tensorboard_logger


def noise_scale(norms: torch.Tensor, grads) -> float:
    """B_simple = tr(Sigma) / |G|^2 from the per-example norms and the batch gradient (mean of
    the per-example gradients); nan where the estimate of |G|^2 is not positive or B < 2."""
    B = norms.shape[0]
    if B < 2:
        return float("nan")
    g2 = sum(float(g.double().square().sum()) for g in grads)
    S = B / (B - 1) * (float(norms.double().square().mean()) - g2)
    G2 = g2 - S / B
    return S / G2 if G2 > 0 else float("nan")


class GradNoisePanels(L.Callback):
    """Every `every_n_steps` logs per_example/grad_norm and per_example/noise_scale.

    Args:
        every_n_steps: steps between panels; 0 turns them off. Default: 50.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._block = None

    def _due(self, trainer) -> bool:
        every = self.every_n_steps
        return (every > 0 and trainer.global_step % every == 0 and trainer.is_global_zero
                and tensorboard_logger(trainer) is not None)

    def _dp(self, trainer):
        from manualbp.lit.dp import DPSGD

        return next((c for c in trainer.callbacks if isinstance(c, DPSGD)), None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (self._due(trainer) and self._dp(trainer) is None and batch[0].shape[0] > 1
                and pl_module.backend == "manual" and trainer.accumulate_grad_batches == 1):
            self._block = mb.per_example(pl_module.net)
            self._block.__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        block.__exit__(None, None, None)
        grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
        self._log(trainer, block.norms, noise_scale(block.norms, grads))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        dp = self._dp(trainer)
        if dp is not None and dp.norms is not None and self._due(trainer):
            self._log(trainer, dp.norms, None)
            dp.norms = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(type(exception), exception, None)

    def _log(self, trainer, norms, scale) -> None:
        writer = tensorboard_logger(trainer).experiment
        step = trainer.global_step
        writer.add_histogram("per_example/grad_norm", norms.detach().float().cpu(), step)
        if scale is not None and scale == scale:  # not nan
            writer.add_scalar("per_example/noise_scale", scale, step)
