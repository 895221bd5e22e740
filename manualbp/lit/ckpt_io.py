"""Reading checkpoints safely: weights_only=True always, and one line for a file that is not one.

Every checkpoint the harness reads goes through read_checkpoint: the runner's checks, the
Trainer (through WeightsOnlyCheckpointIO, whatever weights_only default the installed torch or
Lightning has) and manualbp.lit.load.
"""

import pickle
import re
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# What the harness itself writes next to the weights (see LitMLP.on_save_checkpoint).
RUN_KEY = "manualbp"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict of a Lightning .ckpt file, read with torch.load(weights_only=True).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, one that holds objects
            weights_only refuses, or one that is not a Lightning checkpoint.
    """
    file = Path(path)
    checkpoint = load_weights_only(file, map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        got = f"a dict with keys {sorted(checkpoint)[:6]}" if isinstance(checkpoint, dict) else (
            type(checkpoint).__name__)
        raise CheckpointError(f"checkpoint {file}: expected a Lightning checkpoint (a dict with "
                              f"'state_dict'), got {got}")
    return checkpoint


def load_weights_only(path, map_location="cpu"):
    """torch.load(path, weights_only=True), with one CheckpointError line for a bad file."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file}: expected an existing .ckpt file, got none "
                              "there; runs keep theirs in <run folder>/checkpoints/")
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {file}: the file is empty (0 bytes); it was never "
                              "written completely; use another checkpoint")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise CheckpointError(f"checkpoint {file}: the file is truncated or corrupt (not a "
                                  "torch checkpoint); use another checkpoint") from None
        raise CheckpointError(
            f"checkpoint {file}: torch.load(weights_only=True) refused it (it holds a "
            f"{found.group(1)} object); a harness checkpoint holds only tensors and plain data"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"checkpoint {file}: the file is truncated or corrupt ({reason}); "
                              "use another checkpoint") from None
    return checkpoint


class WeightsOnlyCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but every load is torch.load(weights_only=True).

    Lightning loads more than checkpoints through it (ddp_spawn hands the workers' weights back
    in a temporary file of a bare state dict), so only the file itself is checked here.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_weights_only(path, map_location=map_location or "cpu")
