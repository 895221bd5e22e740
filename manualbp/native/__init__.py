"""The C++ core: the same passes as manualbp/backprop.py, as torch C++ autograd Functions.

Built with torch's own extension tooling (torch.utils.cpp_extension.load) from the sources
beside this file on first use, then cached per torch version, Python and build of torch (the
C++ autograd API is not ABI-stable across torch versions). Nothing is downloaded.

MANUALBP_NATIVE chooses the backend: unset, "auto": native when it builds, else one logged
line and the Python passes; "1": native or a clear error; "0": the Python passes.
MANUALBP_BUILD_DIR overrides the cache folder (default ~/.cache/manualbp, or $XDG_CACHE_HOME).

The native Functions serve plain eager float32/float64 calls; torch.func, torch.compile,
autocast, half dtypes, a Trace and every option the C++ does not implement take the Python
Functions, which stay the readable reference. lib() is what the dispatch lines call.
"""

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from manualbp.apply import autocast_dtype, tracing
from manualbp.rules import RULES

_log = logging.getLogger("manualbp")
_HERE = Path(__file__).resolve().parent
_SOURCES = ("backprop.cpp", "dispatch.cpp", "functions.cpp", "losses.cpp", "per_example.cpp",
            "sign_feedback.cpp")
_DTYPES = (torch.float32, torch.float64)
_CHOICES = {"": "auto", "auto": "auto", "1": "1", "0": "0"}

_lib = None  # the loaded extension module, once built
_tried = False  # whether a build was attempted in this process
_paused = 0  # > 0 inside paused(): every call takes the Python path


def mode() -> str:
    """'auto', '1' or '0', from MANUALBP_NATIVE (raises on anything else)."""
    raw = os.environ.get("MANUALBP_NATIVE", "").strip().lower()
    if raw not in _CHOICES:
        raise ValueError(
            f"MANUALBP_NATIVE: expected 0, 1 or auto (or unset), got {raw!r}; "
            "0 runs the Python passes, 1 insists on the C++ core"
        )
    return _CHOICES[raw]


def build_dir() -> Path:
    """Where the extension is built: one folder per torch version, Python and torch build."""
    root = os.environ.get("MANUALBP_BUILD_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "manualbp")
    accel = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{accel}"
    return Path(root) / tag.replace("+", "_")


def _ninja_path() -> str | None:
    """A folder holding ninja when it is not on PATH: the venv's bin, or the ninja package's."""
    if shutil.which("ninja"):
        return None
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            return str(folder)
    return None


def _build():
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    extra = _ninja_path()
    old_path = os.environ.get("PATH", "")
    if extra is not None:  # for this build only: torch runs `ninja` by name
        os.environ["PATH"] = extra + os.pathsep + old_path
    try:
        return load(name="manualbp_native", sources=[str(_HERE / s) for s in _SOURCES],
                    extra_cflags=["-O2"], build_directory=str(folder), verbose=False)
    finally:
        os.environ["PATH"] = old_path


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def load():
    """The extension module, building it on first use; None when switched off or, in auto mode,
    when it cannot be built (said once, in one logged line)."""
    global _lib, _tried
    choice = mode()
    if choice == "0":
        return None
    if _lib is not None or (_tried and choice == "auto"):
        return _lib
    _tried = True
    try:
        _lib = _build()
    except Exception as error:  # no compiler, no ninja, a failed compile: all the same to us
        if choice == "1":
            raise RuntimeError(
                f"MANUALBP_NATIVE=1: the C++ core could not be built ({_reason(error)}); it "
                "needs a C++17 compiler, ninja (pip install ninja) and torch's headers; unset "
                "MANUALBP_NATIVE (or set it to 0) to run the Python passes"
            ) from None
        _log.warning("manualbp: C++ core unavailable, running the Python passes (%s); "
                     "MANUALBP_NATIVE=0 silences this", _reason(error))
    return _lib


_mode_seen = None  # MANUALBP_NATIVE as read when lib() first answered


def lib():
    """The extension module for a plain eager call, or None for the Python path.

    MANUALBP_NATIVE is read on the first call (reading os.environ costs a microsecond, a good
    part of the Python around a small step); reset() reads it again.
    """
    global _mode_seen
    if _paused:
        return None
    if _mode_seen is None:
        _mode_seen = mode()
    if _mode_seen == "0":
        return None
    return _lib if _lib is not None else load()


def reset() -> None:
    """Forget the switch as read: the next call reads MANUALBP_NATIVE again (tests)."""
    global _mode_seen
    _mode_seen = None


def eager(t: torch.Tensor):
    """lib() where t's call is plain eager float32/float64 (no torch.func, compile or autocast),
    else None."""
    if t.dtype not in _DTYPES or tracing() or autocast_dtype(t) is not None:
        return None
    return lib()


_SERVED = frozenset((None, *RULES))


def serves(module) -> bool:
    """Whether the native core implements what this module asks for: every learning rule in
    manualbp.rules (the C++ pass is handed their feedback matrices), so any module whose rule is
    known. Read from the instance dict: nn.Module.__getattr__ on a missing name raises, which
    costs."""
    return module.__dict__.get("rule", "backprop") in _SERVED


@contextlib.contextmanager
def paused():
    """Every call inside takes the Python passes (tests; options the C++ does not implement,
    such as a per-example context, enter this)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
