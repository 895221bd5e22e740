"""Stop training when the loss turns NaN or infinite, keeping the last good weights on disk."""

import math
from pathlib import Path

import lightning as L
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to try."""


class NonFiniteLossGuard(L.Callback):
    """Checks every training loss before its backward; stops the run at the first bad one.

    The weights at that moment have not seen the bad step's update, so (when they are finite)
    they are saved to `last.ckpt` in the checkpoint folder before the run stops; resume with
    ckpt_path=<that file> and a lower learning rate. Non-finite weights are never saved, so the
    previous last.ckpt survives. Under DDP the ranks agree before anyone stops.
    """

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        saved = self._save_weights(trainer, pl_module)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        raise NonFiniteLossError(
            f"train/loss is {loss.item()} at step {step} (epoch {epoch}); training stopped "
            f"before this update; {saved}; try a lower learning rate, e.g. "
            f"model.optimizer.lr={lr / 10:g} (now {lr:g})"
        )

    @staticmethod
    def _save_weights(trainer, pl_module) -> str:
        """Write last.ckpt if the weights are finite; say what happened."""
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None or trainer.fast_dev_run:
            return "no checkpoint written (checkpointing is off)"
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            return ("the weights are no longer finite, so no checkpoint was written (an earlier "
                    "last.ckpt stays)")
        name = f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"  # last.ckpt
        path = Path(callback.dirpath) / name
        trainer.save_checkpoint(path)
        return f"the weights before it are saved in {path}"
