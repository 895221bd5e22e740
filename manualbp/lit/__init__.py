"""Lightning and Hydra layer of manualbp: the LightningModule, teaching callbacks, the runner.

Core manualbp imports torch only; everything that needs Lightning, Hydra or TensorBoard lives
here. `train(cfg)` is what `python train.py` calls; README.md ("Training") is the user's guide.
"""

from manualbp.lit.alignment import RuleAlignment
from manualbp.lit.boundary import DecisionBoundary
from manualbp.lit.checkpoints import RunCheckpoint, RunInterrupted
from manualbp.lit.ckpt_io import CheckpointError, WeightsOnlyCheckpointIO, read_checkpoint
from manualbp.lit.dp import DPSGD
from manualbp.lit.embedding import HiddenEmbedding
from manualbp.lit.errors import user_message
from manualbp.lit.grad_check import GradCheck
from manualbp.lit.grad_noise import GradNoisePanels
from manualbp.lit.layer_stats import LayerStatsMonitor
from manualbp.lit.module import LitMLP
from manualbp.lit.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from manualbp.lit.progress import EpochLine
from manualbp.lit.reload import load
from manualbp.lit.run_folder import RunFolderError
from manualbp.lit.runner import RunResult, train

__all__ = [
    "CheckpointError",
    "DPSGD",
    "DecisionBoundary",
    "EpochLine",
    "GradCheck",
    "GradNoisePanels",
    "HiddenEmbedding",
    "LayerStatsMonitor",
    "LitMLP",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RuleAlignment",
    "RunCheckpoint",
    "RunFolderError",
    "RunInterrupted",
    "RunResult",
    "WeightsOnlyCheckpointIO",
    "load",
    "read_checkpoint",
    "train",
    "user_message",
]
