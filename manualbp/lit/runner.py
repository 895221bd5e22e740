"""train(cfg): data, model, callbacks, loggers and Trainer from a Hydra config; fit, then test.

Kept apart from the @hydra.main entry (train.py) so tests call it with a config composed by
Hydra's compose API, without a subprocess.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run leaves behind.

    Attributes:
        metrics: last logged values, fit's and then test's (e.g. val/acc_best, test/acc).
        output_dir: the run folder (TensorBoard events, checkpoints/).
        best_ckpt, last_ckpt: checkpoint files, or None when none was written.
        global_step: optimizer steps taken in all, counting those before a resume.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: str = ""
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    global_step: int = 0


def train(cfg: DictConfig) -> RunResult:
    """Build everything the config names, train (cfg.train) and test (cfg.test).

    Args:
        cfg: the composed config of configs/train.yaml (groups data, model, trainer,
            callbacks, logger; root keys seed, ckpt_path, train, test, output_dir).
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path: expected an existing checkpoint file, got '{ckpt_path}'; runs keep "
            "theirs in <run folder>/checkpoints/ (last.ckpt, best-*.ckpt)"
        )
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("run folder: %s", cfg.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_features=datamodule.num_features,
                        num_classes=datamodule.num_classes, task=datamodule.task,
                        _convert_="all")
    log.info("model (%s backward, %s head):\n%s", model.backend, model.head, model.net)
    callbacks = _instantiate_group(cfg, "callbacks")
    if cfg.get("dp") is not None:  # dp=sgd: DP-SGD's clip, noise and accountant, last
        callbacks.append(instantiate(cfg.dp))
    trainer = instantiate(cfg.trainer, callbacks=callbacks,
                          logger=_instantiate_group(cfg, "logger") or False)
    hp_names = (f"hp/val_{model.metric_name}_best", f"hp/test_{model.metric_name}")
    _log_hyperparameters(cfg, trainer, datamodule, model, hp_names)

    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
    callback = trainer.checkpoint_callback
    best = (callback.best_model_path or None) if callback is not None else None
    if cfg.test:
        test_ckpt = best if cfg.train else ckpt_path
        if test_ckpt is None:
            log.warning("testing the current weights: no checkpoint to test from")
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt)
        metrics.update(_floats(trainer.callback_metrics))

    last = Path(callback.dirpath, "last.ckpt") if callback and callback.dirpath else None
    last = str(last) if last is not None and last.is_file() else None
    step = trainer.global_step
    if step == 0 and last is not None:  # ddp_spawn: the steps were counted in the workers
        step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    name = model.metric_name
    hp_values = (metrics.get(f"val/{name}_best", math.nan), metrics.get(f"test/{name}", math.nan))
    for logger in trainer.loggers:
        logger.log_metrics(dict(zip(hp_names, hp_values, strict=True)), step=step)
        logger.finalize("success")
    result = RunResult(metrics, str(cfg.output_dir), best, last, step)
    if trainer.is_global_zero:
        log.info("finished: %s; checkpoints best=%s last=%s", _summary(metrics), best, last)
    return result


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
