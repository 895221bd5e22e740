"""One line for the errors a user can cause: a bad config, missing data, a diverging run.

The entry point shows these as a single log line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

import re

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from manualbp.lit.nonfinite import NonFiniteLossError

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, NonFiniteLossError,
               OmegaConfBaseException, MisconfigurationException)
_USER_ERROR_NAMES = {cls.__name__ for cls in USER_ERRORS} | {"MissingMandatoryValue",
                                                             "InterpolationResolutionError"}
# The last line of a traceback printed in a worker process: "package.ErrorName: message".
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def user_message(err: BaseException) -> str | None:
    """err as one line if the user caused it, else None (a bug: keep the traceback).

    Args:
        err: what train(cfg) raised; Hydra's instantiate wraps errors of the objects it
            builds, and DDP's spawned workers send theirs back as text; both are unwrapped.
    """
    if isinstance(err, InstantiationException):
        cause = err.__cause__
        if cause is not None and not isinstance(cause, ImportError):
            return user_message(cause)
        return _one_line(str(err))  # a _target_ that cannot be found
    if type(err).__name__ == "ProcessRaisedException":  # torch.multiprocessing, from a worker
        lines = [line for line in str(err).splitlines() if line.strip()]
        match = _LAST_LINE.match(lines[-1]) if lines else None
        if match and match.group(1) in _USER_ERROR_NAMES:
            return match.group(2)
        return None
    if isinstance(err, USER_ERRORS):
        return _one_line(str(err))
    return None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
