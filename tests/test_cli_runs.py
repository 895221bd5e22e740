"""`python train.py` stopped by signals, swept with failing jobs, and read back, in subprocesses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manualbp.lit import read_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["callbacks=minimal", "trainer.enable_model_summary=false", "test=false"]
STEPS = 4  # iris: 105 training rows in batches of 32
WAIT = 180  # seconds: the most any wait below may take before the test fails


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(out: Path, *args: str) -> subprocess.Popen:
    """train.py in the background, its output into a file (a pipe could fill and block it)."""
    handle = out.open("w")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=_env(),
                            stdout=handle, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (status {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {WAIT} s")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"train.py did not stop within {WAIT} s of the signal")


def _long_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    run = tmp_path / name
    out = tmp_path / f"{name}.out"
    proc = _start(out, "data=iris", *QUIET, "trainer.max_epochs=100000", f"hydra.run.dir={run}")
    _wait_for(run / "checkpoints" / "last.ckpt", proc)  # the first epoch has finished
    return proc, run, out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_state_says_how_to_resume_and_the_resume_is_exact(
        compose_train, tmp_path, signum):
    proc, run, out = _long_run(tmp_path, "run")
    proc.send_signal(signum)
    assert _finish(proc) == 128 + signum
    errors = [line for line in out.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    name = signal.Signals(signum).name
    assert f"{name}: training stopped at step " in errors[0]
    saved = errors[0].split("its state is saved in ")[1].split(";")[0]
    assert Path(saved).parent == run / "checkpoints"
    assert errors[0].endswith(f"resume with: python train.py data=iris {' '.join(QUIET)} "
                              f"trainer.max_epochs=100000 ckpt_path={saved}")
    step = read_checkpoint(saved)["global_step"]
    assert step >= STEPS

    # Resume in a fresh folder, to the end of the next epoch: the weights are those of a run
    # that was never stopped (same rows, same order, same optimizer state).
    epochs = step // STEPS + 1
    common = ["data=iris", *QUIET, "trainer.enable_progress_bar=false",
              f"trainer.max_epochs={epochs}"]
    resumed = train(compose_train(*common, f"ckpt_path={saved}", f"output_dir={tmp_path}/r"))
    straight = train(compose_train(*common, f"output_dir={tmp_path}/s"))
    assert resumed.global_step == straight.global_step == epochs * STEPS
    got = read_checkpoint(resumed.last_ckpt)["state_dict"]
    for key, value in read_checkpoint(straight.last_ckpt)["state_dict"].items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_sigkill_leaves_the_last_completed_epoch_intact(tmp_path):
    proc, run, _ = _long_run(tmp_path, "run")
    proc.kill()
    proc.wait(timeout=WAIT)
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")  # loads: it is complete
    assert last["global_step"] == (last["epoch"] + 1) * STEPS


@pytest.mark.slow
def test_a_sweep_reports_every_failing_job_and_runs_the_rest(tmp_path):
    out = tmp_path / "sweep.out"
    proc = _start(out, "-m", "data=iris,mnist", "model.activation=relu,nonsense",
                  "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.01,1e30",
                  "trainer.max_epochs=1", "trainer.enable_progress_bar=false", *QUIET,
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert _finish(proc) == 1
    text = out.read_text()
    summary = text[text.index("sweep: 8 jobs, 7 failed"):].splitlines()[1:9]
    assert (tmp_path / "sweep" / "summary.txt").read_text().splitlines()[1:] == summary
    jobs = {line.split(": ", 1)[1].rsplit(": ", 1)[0]: line for line in summary}
    ok = [line for line in summary if "val/acc=" in line]
    assert len(ok) == 1 and "data=iris model.activation=relu" in ok[0] and "lr=0.01" in ok[0]
    assert len(jobs) == 8
    failures = [line for line in summary if line not in ok]
    assert sum("mnist: data.path is not set" in line for line in failures) == 4  # missing data
    assert sum("activation" in line and "nonsense" in line.split(": ", 2)[2]
               for line in failures) == 2  # a bad value
    diverged = [line for line in failures if "train/loss is" in line]
    assert len(diverged) == 1 and "lr=1e+30" in diverged[0]  # a diverging learning rate
    # Sweep jobs are named by what differs, after their number.
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(folders) == 8 and all("data=" in f and "model.activation=" in f for f in folders)


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "half.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "out"
    proc = _start(out, "train=false", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert _finish(proc) == 1
    text = out.read_text()
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"checkpoint {bad}: the file is truncated or corrupt" in errors[0]
    assert "Traceback" not in text
