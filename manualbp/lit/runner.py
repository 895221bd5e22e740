"""train(cfg): data, model, callbacks, loggers and Trainer from a Hydra config; fit, then test.

Kept apart from the @hydra.main entry (train.py) so tests call it with a config composed by
Hydra's compose API, without a subprocess.
"""

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from manualbp.lit.checkpoints import LAST, RunCheckpoint
from manualbp.lit.ckpt_io import WeightsOnlyCheckpointIO, read_checkpoint
from manualbp.lit.progress import EpochLine
from manualbp.lit.run_config import check_data_fits, config_from_checkpoint
from manualbp.lit.run_folder import check_run_folder, write_run_config

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run leaves behind.

    Attributes:
        metrics: last logged values, fit's and then test's (e.g. val/acc_best, test/acc).
        output_dir: the run folder (TensorBoard events, checkpoints/).
        best_ckpt, last_ckpt: checkpoint files, or None when none was written.
        global_step: optimizer steps taken in all, counting those before a resume.
        stop_reason: why training ended before max_epochs (early stopping), else None.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: str = ""
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    global_step: int = 0
    stop_reason: str | None = None

    def metrics_line(self) -> str:
        """The headline results in one line, e.g. for a sweep's summary."""
        return _summary(self.metrics) + (f"; {self.stop_reason}" if self.stop_reason else "")


def train(cfg: DictConfig, overrides: list[str] | None = None) -> RunResult:
    """Build everything the config names, train (cfg.train) and test (cfg.test).

    Args:
        cfg: the composed config of configs/train.yaml (groups data, model, trainer,
            callbacks, logger; root keys seed, ckpt_path, train, test, output_dir).
        overrides: the command-line overrides (train.py passes Hydra's); with ckpt_path, the
            data and model config come from the checkpoint and only these may change them.

    Raises:
        RunInterrupted: SIGINT or SIGTERM stopped training; the state is saved (err.path).
    """
    ckpt_path = cfg.get("ckpt_path")
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    if not cfg.train and checkpoint is None:
        raise ValueError("train=false: expected ckpt_path=<file.ckpt> to test, got none; "
                         "without one there are only untrained random weights to test")
    if checkpoint is not None:
        cfg = config_from_checkpoint(cfg, checkpoint, ckpt_path, overrides)
    _check_accelerator(cfg.trainer)
    callbacks = build_callbacks(cfg)
    continuing = False
    if rank_zero_only.rank == 0:  # the other ranks write into rank zero's folder, or nowhere
        dirs = [c.dirpath for c in callbacks if isinstance(c, RunCheckpoint)]
        continuing = check_run_folder(cfg.output_dir, ckpt_path, dirs)
        write_run_config(cfg.output_dir, cfg, overrides)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("run folder: %s%s", cfg.output_dir, " (continuing the run there)" if continuing
             else "")
    datamodule = instantiate(cfg.data)
    if checkpoint is not None:
        check_data_fits(checkpoint, datamodule, ckpt_path)
    model = instantiate(cfg.model, num_features=datamodule.num_features,
                        num_classes=datamodule.num_classes, task=datamodule.task,
                        _convert_="all")
    model.run_config = {key: OmegaConf.to_container(cfg[key], resolve=True)
                        for key in ("data", "model")}
    log.info("model (%s backward, %s head):\n%s", model.backend, model.head, model.net)
    if cfg.get("dp") is not None:  # dp=sgd: DP-SGD's clip, noise and accountant
        callbacks.append(instantiate(cfg.dp))
    show_bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    if not show_bar:
        callbacks.append(EpochLine())
    trainer = instantiate(cfg.trainer, callbacks=callbacks,
                          logger=_instantiate_group(cfg, "logger") or False,
                          plugins=[WeightsOnlyCheckpointIO()], enable_progress_bar=show_bar)
    hp_names = (f"hp/val_{model.metric_name}_best", f"hp/test_{model.metric_name}")
    _log_hyperparameters(cfg, trainer, datamodule, model, hp_names)

    metrics: dict[str, float] = {}
    run_checkpoint = next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)
    stop_reason = None
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
        stop_reason = _early_stop_reason(trainer)
    best = run_checkpoint.best_path if run_checkpoint is not None else None
    if cfg.test:
        test_ckpt = best if cfg.train else ckpt_path
        if test_ckpt is None:
            log.warning("testing the current weights: no checkpoint to test from")
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt)
        metrics.update(_floats(trainer.callback_metrics))

    last = Path(run_checkpoint.dirpath, LAST) if run_checkpoint is not None else None
    last = str(last) if last is not None and last.is_file() else None
    step = trainer.global_step
    if step == 0 and last is not None:  # ddp_spawn: the steps were counted in the workers
        step = read_checkpoint(last)["global_step"]
    name = model.metric_name
    hp_values = (metrics.get(f"val/{name}_best", math.nan), metrics.get(f"test/{name}", math.nan))
    for logger in trainer.loggers:
        logger.log_metrics(dict(zip(hp_names, hp_values, strict=True)), step=step)
        logger.finalize("success")
    result = RunResult(metrics, str(cfg.output_dir), best, last, step, stop_reason)
    if trainer.is_global_zero:
        log.info("finished: %s; checkpoints best=%s last=%s", _summary(metrics), best, last)
    return result


def build_callbacks(cfg: DictConfig) -> list:
    """The callbacks of cfg.callbacks, in config order: the one place callbacks are made."""
    return _instantiate_group(cfg, "callbacks")


def _check_accelerator(trainer_cfg: DictConfig) -> None:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator}: expected a CUDA GPU, but this "
                         "machine has none that torch can use; train on the CPU with trainer=cpu "
                         "(or trainer.accelerator=auto)")


def _early_stop_reason(trainer) -> str | None:
    """One line when EarlyStopping ended the run: at which epoch and why; logged too."""
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            best = float(callback.best_score)
            reason = (f"early stopping: {callback.monitor} did not improve by more than "
                      f"{abs(callback.min_delta):g} for {callback.patience} epochs (best "
                      f"{best:.4g}); stopped after epoch {callback.stopped_epoch} of "
                      f"trainer.max_epochs={trainer.max_epochs}")
            if trainer.is_global_zero:
                log.info(reason)
            return reason
    return None


def _instantiate_group(cfg: DictConfig, group: str) -> list:
    """Instantiate every entry of a group like callbacks or logger; null entries are off."""
    objects = []
    for name, node in (cfg.get(group) or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{group}.{name}: expected a config with a _target_, got {node}")
        objects.append(instantiate(node, _convert_="all"))
    return objects


def _log_hyperparameters(cfg, trainer, datamodule, model, hp_names) -> None:
    """The resolved config plus data-derived sizes, with the hp/ metrics of the HPARAMS tab."""
    config = OmegaConf.to_container(cfg, resolve=True)
    params = {key: _without_partial(config[key]) for key in ("seed", "data", "model", "trainer")}
    params["data"]["num_features"] = datamodule.num_features
    params["data"]["num_classes"] = datamodule.num_classes
    params["model"]["num_params"] = sum(p.numel() for p in model.parameters())
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # Placeholders until the run ends; the HPARAMS tab shows each tag's last value.
            logger.log_hyperparams(params, metrics={name: math.nan for name in hp_names})
        else:
            logger.log_hyperparams(params)


def _without_partial(node):
    if isinstance(node, dict):
        return {k: _without_partial(v) for k, v in node.items() if k != "_partial_"}
    return node


def _floats(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _summary(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith(("test/", "val/")) and k.endswith(("acc", "best"))]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in sorted(keys)) or "no metrics"
