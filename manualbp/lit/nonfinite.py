"""Stop training when the loss turns NaN or infinite, pointing at the last good state on disk."""

import math

import lightning as L
import torch

from manualbp.lit.checkpoints import RunCheckpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to try."""


class NonFiniteLossGuard(L.Callback):
    """Checks every training loss before its backward; stops the run at the first bad one.

    Nothing is written at that moment: weights that produce a NaN loss can be finite and still
    useless (1e29), so the guard points at the last good state instead, the last.ckpt of the
    latest completed epoch (RunCheckpoint never writes non-finite weights over it), or the
    checkpoint this run resumed from. Under DDP the ranks agree before anyone stops.
    """

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        raise NonFiniteLossError(
            f"train/loss is {loss.item()} at step {step} (epoch {epoch}); training stopped "
            f"before this update; {self._last_good(trainer, lr)} (now {lr:g})"
        )

    @staticmethod
    def _last_good(trainer, lr: float) -> str:
        callback = trainer.checkpoint_callback
        lower = f"model.optimizer.lr={lr / 10:g}"
        if trainer.fast_dev_run or not isinstance(callback, RunCheckpoint):
            return f"no checkpoint is kept (checkpointing is off); try a lower learning rate, " \
                   f"e.g. {lower}"
        if callback.last_path is None:
            return (f"no epoch had finished, so there is no good state to resume from; start "
                    f"again with a lower learning rate, e.g. {lower}")
        return (f"the last good state is {callback.last_path} (step {callback.last_step}, "
                f"epoch {callback.last_epoch}); resume from it with a lower "
                f"learning rate: ckpt_path={callback.last_path} {lower}")
