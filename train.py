"""Train a manualbp network: `python train.py [key=value ...]`; see README.md ("Training").

A thin Hydra entry: the work is manualbp.lit.train(cfg), which tests call directly. Errors a
user can cause (a typo'd value, missing data files, a diverging loss) end as one log line and
exit status 1; HYDRA_FULL_ERROR=1 shows their full traceback instead.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    # Imported here so that a config typo is refused before torch and Lightning load.
    from manualbp.lit import train, user_message

    try:
        return train(cfg)  # the RunResult, for Hydra callbacks such as RulesTable
    except Exception as err:
        message = user_message(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error(message)
        sys.exit(1)


if __name__ == "__main__":
    main()
