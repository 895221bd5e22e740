"""The run folder: checked before anything trains, never shared by two runs.

A folder that already holds a run (checkpoints, TensorBoard events, a saved config) is only
reused to continue that very run, i.e. with ckpt_path inside it; otherwise the run is refused,
so a fixed hydra.run.dir (torchrun, SLURM) can never mix two runs' checkpoints or curves.
Hydra's own .hydra/ writing is off (configs/train.yaml); the runner writes it after the check.
"""

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class RunFolderError(ValueError):
    """The run folder or the checkpoint folder cannot be used; the message says why."""


def _previous_run(folder: Path) -> list[str]:
    """What a run leaves in its folder, relative names."""
    found = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("events.out.tfevents.*"),
             *folder.glob(".hydra/config*.yaml"), *folder.glob("csv/metrics.csv")]
    return sorted(str(p.relative_to(folder)) for p in found)


def check_run_folder(output_dir, ckpt_path, checkpoint_dirs) -> bool:
    """Refuse an unusable or already used folder; True when the run continues the one there.

    Args:
        output_dir: the run folder (cfg.output_dir).
        ckpt_path: the checkpoint the run starts from, or None.
        checkpoint_dirs: folders checkpoints will be written to.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output_dir: {folder} is an existing file, expected a folder (or a "
                             "path that does not exist yet); choose another hydra.run.dir")
    continuing = False
    if folder.is_dir():
        previous = _previous_run(folder)
        inside = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(
            folder.resolve())
        if previous and not inside:
            shown = ", ".join(previous[:3]) + (" ..." if len(previous) > 3 else "")
            raise RunFolderError(
                f"output_dir: {folder} already holds a run ({shown}); a new run needs a new "
                f"folder (another hydra.run.dir), or continue that run with "
                f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}")
        continuing = bool(previous)
    for target, name in [(folder, "output_dir"), *((Path(d), "checkpoint folder")
                                                   for d in checkpoint_dirs)]:
        _check_writable(target, name)
    return continuing


def _check_writable(folder: Path, name: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise RunFolderError(f"{name}: cannot write to {folder} ({err.strerror or err}); choose "
                             "a folder you can write to") from None


def write_run_config(output_dir, cfg: DictConfig, overrides) -> Path:
    """.hydra/config.yaml and overrides.yaml (config-2.yaml, ... when a run is continued)."""
    folder = Path(output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    n, suffix = 1, ""
    while (folder / f"config{suffix}.yaml").exists():
        n += 1
        suffix = f"-{n}"
    OmegaConf.save(cfg, folder / f"config{suffix}.yaml")
    partial = folder / f".overrides{suffix}.yaml"
    OmegaConf.save(OmegaConf.create(list(overrides or [])), partial)
    os.replace(partial, folder / f"overrides{suffix}.yaml")
    return folder / f"config{suffix}.yaml"
