"""Train a manualbp network: `python train.py [key=value ...]`; see README.md ("Training").

A thin Hydra entry: the work is manualbp.lit.train(cfg), which tests call directly. Errors a
user can cause (a typo'd value, missing data files, a diverging loss) end as one log line and
exit status 1; HYDRA_FULL_ERROR=1 shows their full traceback instead. SIGINT or SIGTERM saves
the state, says how to resume, and exits with 128 + the signal number. In a sweep (-m) a failing
job is reported and the others still run; a summary of every job ends the sweep, and the exit
status is 1 if any job failed.
"""

import logging
import os
import re
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")
_JOBS: list[tuple[str, str, str | None]] = []  # sweep jobs: (name, result, error)


def run_name(override_dirname: str) -> str:
    """'_' + the overrides as a folder-safe name ('' without any): runs say what differs."""
    if not override_dirname:
        return ""
    return "_" + re.sub(r"[^\w.=,+-]", "_", override_dirname)[:150]


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    # Imported here so that a config typo is refused before torch and Lightning load.
    from manualbp.lit import RunInterrupted, train, user_message

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra prints these
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping:
        main.sweep_dir = hydra_cfg.sweep.dir
    job = f"{hydra_cfg.job.num if sweeping else 0}: {' '.join(overrides) or '(defaults)'}"
    try:
        result = train(cfg, overrides)
    except RunInterrupted as err:
        again = [o for o in overrides if not o.startswith("ckpt_path=")]
        if err.path is not None:
            again.append(f"ckpt_path={err.path}")
        log.error("%s; resume with: python train.py %s", err, shlex.join(again))
        sys.exit(128 + err.signum)
    except Exception as err:
        message = user_message(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or (message is None and not sweeping):
            raise
        if message is None:  # a bug: keep its traceback in the log, and go on with the sweep
            log.exception("job %s failed", job)
            message = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        log.error(message)
        if not sweeping:
            sys.exit(1)
        _JOBS.append((job, "FAILED", message))
        return
    if sweeping:
        _JOBS.append((job, result.metrics_line(), None))
    return result  # the RunResult, for Hydra callbacks such as RulesTable


def _sweep_summary() -> int:
    """Print one line per sweep job (its result or its error); 1 if any job failed."""
    if not _JOBS:
        return 0
    failed = sum(error is not None for _, _, error in _JOBS)
    lines = [f"sweep: {len(_JOBS)} jobs, {failed} failed"]
    lines += [f"  job {job}: {error or result}" for job, result, error in _JOBS]
    print("\n".join(lines), flush=True)
    summary_dir = getattr(main, "sweep_dir", None)
    if summary_dir:
        Path(summary_dir, "summary.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    main()
    sys.exit(_sweep_summary())
