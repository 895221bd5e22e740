"""One plain log line per epoch, for logs that are not a terminal (where a progress bar would
write every redraw into the file)."""

import logging

import lightning as L

log = logging.getLogger(__name__)


class EpochLine(L.Callback):
    """Logs `epoch 3/40: train/loss=0.41 val/loss=0.38 val/acc=0.89 ...` after each epoch."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = [k for k in sorted(metrics) if k.startswith(("train/", "val/"))]
        values = " ".join(f"{k}={float(metrics[k]):.4g}" for k in shown)
        log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, values)
