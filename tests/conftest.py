"""Shared fixtures."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Quiet, quick settings for runs inside tests; a test adds its own overrides after these.
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def pytest_sessionstart(session):
    """Build the C++ core (or find it cached) once, before any test or subprocess needs it:
    with MANUALBP_NATIVE=1 a failed build stops the run here with its one clear message."""
    from manualbp import native

    native.load()


@pytest.fixture(params=["native", "python"])
def core(request):
    """The test runs once on the C++ core (skipped where it is not built) and once on the Python
    passes (the core paused for the whole test)."""
    from manualbp import native

    if request.param == "python":
        with native.paused():
            yield request.param
        return
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")
    yield request.param


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides) -> configs/train.yaml composed by Hydra, writing into tmp_path."""

    def _compose(*overrides: str, quiet: bool = True):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=[f"output_dir={tmp_path}", *(QUIET if quiet else []),
                                               *overrides])

    return _compose
