"""The run's checkpoints: last.ckpt at the end of every epoch, the best over the whole run, and
interrupted.ckpt when SIGINT or SIGTERM stops training.

Written here rather than configured from Lightning's ModelCheckpoint, whose save_last rules
changed between the Lightning versions pyproject allows (in some, last.ckpt was only rewritten
in epochs that set a new best). Every file is written to a temporary name and renamed, so a
kill at any moment leaves the previous complete file.
"""

import logging
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

LAST, INTERRUPTED = "last.ckpt", "interrupted.ckpt"


class RunInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM; the state at that moment is saved in `path`."""

    def __init__(self, message: str, signum: int, path: str | None) -> None:
        super().__init__(message)
        self.signum, self.path = signum, path


class RunCheckpoint(Checkpoint):
    """Keeps `dirpath/last.ckpt` (every epoch) and `dirpath/best-epochNNN.ckpt` (best monitor).

    last.ckpt holds the weights, optimizer state and step count at the end of each epoch,
    after validation, whatever the monitored value did; it is not rewritten when the weights or
    the monitored value are no longer finite, so it stays the last good state. The best
    checkpoint is the best over the whole run: its score and file travel in the checkpoint, and
    a resume into a new folder copies the file over, so later epochs must beat it.

    Args:
        dirpath: the folder of the checkpoints (created when the first one is written).
        monitor: the metric that picks the best checkpoint. Default: val/loss.
        mode: "min" or "max". Default: min.
        filename: name of the best checkpoint, formatted with `epoch`.
            Default: best-epoch{epoch:03d}.

    Attributes:
        best_path, best_score, best_epoch: the best checkpoint so far (None before one exists).
        last_path, last_epoch, last_step: the latest last.ckpt written or resumed from.
    """

    def __init__(self, dirpath: str, monitor: str = "val/loss", mode: str = "min",
                 filename: str = "best-epoch{epoch:03d}") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"callbacks.model_checkpoint.mode: expected 'min' or 'max', got "
                             f"{mode!r}")
        self.dirpath, self.monitor, self.mode, self.filename = str(dirpath), monitor, mode, filename
        self.best_path: str | None = None
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.last_path: str | None = None
        self.last_epoch: int | None = None
        self.last_step: int | None = None
        self.stop_signal: int | None = None
        self._previous_handlers: dict | None = None
        self._resumed: tuple | None = None  # (epoch, step) of the checkpoint resumed from

    @property
    def state_key(self) -> str:
        return f"RunCheckpoint[{self.monitor},{self.mode}]"

    def state_dict(self) -> dict:
        return {"best_path": self.best_path, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "dirpath": self.dirpath}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_path = state_dict.get("best_path")
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")

    # -- resume ----------------------------------------------------------------------------

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._resumed = (checkpoint.get("epoch"), checkpoint.get("global_step"))

    def on_train_start(self, trainer, pl_module) -> None:
        self._catch_signals()
        if trainer.ckpt_path and self._resumed:  # the last good state until an epoch ends
            self.last_path = str(trainer.ckpt_path)
            self.last_epoch, self.last_step = self._resumed
        if self.best_path is None or Path(self.best_path).parent == Path(self.dirpath):
            return
        # Resumed into a new run folder: bring the best so far along, or say that it is gone.
        source = Path(self.best_path)
        if not source.is_file():
            log.warning("the best checkpoint before the resume (%s, %s=%.4g) is gone; the best "
                        "is now taken over the epochs from here on", source, self.monitor,
                        self.best_score)
            self.best_path = self.best_score = self.best_epoch = None
            return
        target = Path(self.dirpath) / source.name
        if trainer.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        self.best_path = str(target)
        trainer.strategy.barrier("RunCheckpoint.copy_best")

    # -- every epoch -------------------------------------------------------------------------

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        score = self._score(trainer)
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        epoch = trainer.current_epoch
        if not finite or (score is not None and not math.isfinite(score)):
            what = "the weights" if not finite else f"{self.monitor}={score}"
            log.warning("epoch %d: %s no longer finite; %s keeps the last good state (epoch %s)",
                        epoch, what, LAST, self.last_epoch)
            return
        if score is not None and self._better(score):
            previous = self.best_path
            self.best_score, self.best_epoch = score, epoch
            self.best_path = str(Path(self.dirpath) / f"{self.filename.format(epoch=epoch)}.ckpt")
            self._save(trainer, self.best_path)
            if previous and previous != self.best_path and trainer.is_global_zero:
                if Path(previous).parent == Path(self.dirpath):
                    Path(previous).unlink(missing_ok=True)
        self.last_path, self.last_epoch = str(Path(self.dirpath) / LAST), epoch
        self.last_step = trainer.global_step
        self._save(trainer, self.last_path)
        if self.stop_signal is not None:  # it came during validation: last.ckpt is the state
            self._interrupted(trainer, self.last_path)

    def _score(self, trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    @staticmethod
    def _save(trainer, path: str) -> None:
        """trainer.save_checkpoint to a temporary name, then an atomic rename (rank zero)."""
        target = Path(path)
        partial = target.with_name(f".{target.name}.partial")
        trainer.save_checkpoint(partial, weights_only=False)  # all ranks; rank zero writes
        if trainer.is_global_zero:
            os.replace(partial, target)
        trainer.strategy.barrier("RunCheckpoint.save")

    # -- SIGINT / SIGTERM ----------------------------------------------------------------------

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._catch_signals()

    def _catch_signals(self) -> None:
        """Turn SIGINT and SIGTERM into "stop after this step, saving first" while fitting.

        Installed once the Trainer has set its own handlers (which would end the run with
        exit status 0 on SIGTERM); a second signal stops at once (KeyboardInterrupt).
        """
        if self._previous_handlers is not None or (
                threading.current_thread() is not threading.main_thread()):
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            log.warning("%s received: stopping after this training step, once its state is "
                        "saved (send it again to stop at once)", signal.Signals(signum).name)

        self._previous_handlers = {s: signal.signal(s, handler)
                                   for s in (signal.SIGINT, signal.SIGTERM)}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, previous in (self._previous_handlers or {}).items():
            signal.signal(signum, previous)
        self._previous_handlers = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        asked = self.stop_signal is not None
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        if trainer.fast_dev_run:
            self._interrupted(trainer, None)
        path = str(Path(self.dirpath) / INTERRUPTED)
        self._save(trainer, path)
        self._interrupted(trainer, path)

    def _interrupted(self, trainer, path: str | None) -> None:
        signum = int(trainer.strategy.broadcast(self.stop_signal or signal.SIGTERM))
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        saved = f"its state is saved in {path}" if path else "no checkpoint written (fast_dev_run)"
        raise RunInterrupted(f"{signal.Signals(signum).name}: training stopped at {where}; {saved}",
                             signum, path)
