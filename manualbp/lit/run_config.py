"""What a checkpoint knows about itself: the data and model config it was trained with.

LitMLP saves the run's data and model config (resolved, plain data) in every checkpoint. A run
given ckpt_path takes both from the checkpoint, so `train=false ckpt_path=<file>` tests the
network as it was trained and a resume needs nothing but the file; an explicit command-line
override that disagrees with the checkpoint is refused, naming both values (a group choice
such as data=xor must name the checkpoint's data set; its other keys stay the checkpoint's).
"""

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from manualbp.lit.ckpt_io import RUN_KEY, CheckpointError

log = logging.getLogger(__name__)

# Overrides that may differ from the checkpoint: where the data live now, how they are batched,
# and (they do not change what the network is) the optimizer and its schedule.
FREE_KEYS = ("data.path", "data.batch_size", "data.num_workers", "model.optimizer",
             "model.scheduler", "model.scheduler_monitor")
# Targets a checkpoint's config may name: instantiating anything else from a file would undo
# what weights_only=True protects against.
SAFE_TARGETS = ("manualbp.", "torch.optim.")
# Checkpoints written before the config was stored: the model keys hparams still have.
_HPARAM_KEYS = ("hidden_sizes", "activation", "backend", "head", "init", "sizes")


def stored_config(checkpoint: dict, path) -> dict | None:
    """{"data": ..., "model": ...} saved in the checkpoint, or None for an older checkpoint."""
    config = (checkpoint.get(RUN_KEY) or {}).get("config")
    if config is None:
        return None
    for node in config.values():
        for target in _targets(node):
            if not str(target).startswith(SAFE_TARGETS):
                raise CheckpointError(f"checkpoint {path}: its config names _target_ {target!r}; "
                                      f"only targets under {SAFE_TARGETS} are built from a file")
    return config


def config_from_checkpoint(cfg: DictConfig, checkpoint: dict, path, overrides) -> DictConfig:
    """cfg with data and model from the checkpoint; explicit overrides must agree or be free.

    Args:
        cfg: the composed run config.
        checkpoint: the checkpoint dict (read_checkpoint).
        path: its file, for messages.
        overrides: the command-line overrides (Hydra's hydra.overrides.task); None: none.
    """
    stored = stored_config(checkpoint, path)
    explicit = [_key(o) for o in overrides or []]
    cfg = cfg.copy()
    if stored is None:
        hparams = checkpoint.get("hyper_parameters") or {}
        log.warning("checkpoint %s does not record its data config (written by an older "
                    "manualbp); using data=%s from the command line", path, cfg.data._target_)
        with open_dict(cfg):
            for key in _HPARAM_KEYS:
                if key in hparams:
                    cfg.model[key] = hparams[key]
        return cfg
    current = OmegaConf.to_container(cfg, resolve=True)
    for key in explicit:
        if key in ("experiment", "data", "model"):  # a preset: it must name the same thing
            for group in ("data", "model") if key == "experiment" else (key,):
                _refuse_difference(f"{group}._target_", stored[group].get("_target_"),
                                   current[group].get("_target_"), path)
        elif key.startswith(("data.", "model.")) and not _is_free(key):
            group, _, rest = key.partition(".")
            _refuse_difference(key, _select(stored[group], rest), _select(current[group], rest),
                               path)
    with open_dict(cfg):
        for group in ("data", "model"):
            node = OmegaConf.create(stored[group])
            for key in explicit:
                if _is_free(key) and key.startswith(f"{group}."):
                    OmegaConf.update(node, key.partition(".")[2],
                                     OmegaConf.select(cfg, key), force_add=True)
            cfg[group] = node
    return cfg


def check_data_fits(checkpoint: dict, datamodule, path) -> None:
    """The data's feature and class counts and task must be the checkpoint's, named if not."""
    hparams = checkpoint.get("hyper_parameters") or {}
    for name in ("num_features", "num_classes", "task"):
        trained, now = hparams.get(name), getattr(datamodule, name, None)
        if trained is not None and trained != now:
            raise CheckpointError(
                f"checkpoint {path} was trained on data with {name}={trained}, but data "
                f"'{datamodule.name}' has {name}={now}; use the data it was trained on")


def _refuse_difference(where: str, trained, asked, path) -> None:
    difference = _first_difference(trained, asked, where)
    if difference is not None:
        key, old, new = difference
        raise CheckpointError(
            f"ckpt_path={path} was trained with {key}={old}, the command line asks for "
            f"{key}={new}; drop that override to use the checkpoint as it was trained")


def _first_difference(trained, asked, where: str):
    if isinstance(trained, dict) and isinstance(asked, dict):
        for name in sorted(set(trained) | set(asked)):
            key = f"{where}.{name}"
            if _is_free(key):
                continue
            found = _first_difference(trained.get(name), asked.get(name), key)
            if found is not None:
                return found
        return None
    return None if trained == asked else (where, trained, asked)


def _is_free(key: str) -> bool:
    return any(key == free or key.startswith(f"{free}.") for free in FREE_KEYS)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _select(node, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _targets(item)
