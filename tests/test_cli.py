"""`python train.py ...` as users run it, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=iris", "trainer.max_epochs=1", "callbacks=minimal",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _run(*args: str, full_error: bool = False, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=300)


def test_happy_path_trains_tests_and_prints_the_test_table(tmp_path):
    tiny = [o for o in TINY if "progress_bar" not in o]  # the bar is off: stdout is a file
    done = _run(*tiny, "model.backend=autograd", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test/acc" in done.stdout and "test/loss" in done.stdout
    # The run folder: its time, then what the command line changed.
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    assert run.name.endswith("_callbacks=minimal,data=iris,model.backend=autograd,"
                             "trainer.enable_model_summary=false,trainer.max_epochs=1")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    output = done.stdout + done.stderr
    assert output.count("GPU available") == 1  # Lightning's lines once, not twice
    assert "epoch 1/1: train/acc=" in output  # one plain line per epoch instead of a bar
    assert "━" not in output and "\r" not in output


@pytest.mark.parametrize(("override", "expected"), [
    ("model.hidden_sizez=[8]", "Key 'hidden_sizez' is not in struct"),
    ("data=spiral", "Could not find 'data/spiral'"),
])
def test_a_typo_is_refused_with_hydras_message_naming_it(tmp_path, override, expected):
    done = _run(override, f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_data_path_is_one_line_and_a_nonzero_exit(tmp_path):
    done = _run("data=mnist", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "mnist: data.path is not set" in errors[0]
    assert "train-images-idx3-ubyte" in errors[0]
    assert "Traceback" not in output


def test_hydra_full_error_shows_the_traceback(tmp_path):
    done = _run("data=mnist", f"hydra.run.dir={tmp_path}", full_error=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "data.path is not set" in done.stderr


@pytest.mark.slow
def test_multirun_sweeps_two_jobs_into_their_own_folders(tmp_path):
    done = _run("-m", "model.activation=sigmoid,relu", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    for job, activation in (("0", "sigmoid"), ("1", "relu")):
        (folder,) = tmp_path.glob(f"{job}_*model.activation={activation}*")
        assert f"activation: {activation}" in (folder / ".hydra" / "config.yaml").read_text()
        assert list(folder.glob("events.out.tfevents.*"))
        assert (folder / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_strategy_relaunches_train_py_into_the_same_run_folder(tmp_path):
    # What trainer=ddp does on GPUs, here with 2 CPU processes: Lightning starts rank 1 by
    # running train.py again, pointed at rank 0's run folder.
    done = _run(*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test/acc" in done.stdout
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # rank 1 ran in this folder
    assert len(list(tmp_path.glob(".hydra/config.yaml"))) == 1
