"""Finding the TensorBoard writer of a Trainer, for callbacks that log more than scalars."""

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The Trainer's TensorBoardLogger on global rank zero, else None (other ranks, no logger)."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
