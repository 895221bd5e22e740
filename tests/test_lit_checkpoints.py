"""Checkpoints as a user meets them: last.ckpt every epoch, resume, the best over the whole run,
a checkpoint that knows its data and model, safe loading, and load()."""

from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import manualbp as mb
from manualbp.lit import (
    CheckpointError,
    RunFolderError,
    WeightsOnlyCheckpointIO,
    load,
    read_checkpoint,
    train,
)

# iris: 105 training rows in batches of 32, 4 steps per epoch.
TINY = ["data=iris", "callbacks=minimal", "trainer.num_sanity_val_steps=0", "test=false",
        "trainer.log_every_n_steps=1"]
STEPS = 4
# The best checkpoint is the one with the HIGHEST val/loss: on a run whose loss falls, epoch 0
# stays best for good, which is when Lightning's save_last used to stop rewriting last.ckpt.
WORST_IS_BEST = "callbacks.model_checkpoint.mode=max"


class _RecordLast(L.Callback):
    """At the start of each epoch, what last.ckpt holds: (epoch, step, Adam's step count)."""

    seen: list = []  # on the class: Hydra builds the instance

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            ckpt = read_checkpoint(trainer.checkpoint_callback.dirpath + "/last.ckpt")
            adam = ckpt["optimizer_states"][0]["state"][0]["step"]
            type(self).seen.append((ckpt["epoch"], ckpt["global_step"], int(adam)))


def _steps(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def _weights(path):
    return read_checkpoint(path)["state_dict"]


def test_last_is_every_epoch_and_a_resume_continues_with_the_best_of_the_whole_run(
        compose_train, tmp_path):
    _RecordLast.seen = []
    first = train(compose_train(*TINY, WORST_IS_BEST, "trainer.max_epochs=3",
                                "+callbacks.record={_target_:test_lit_checkpoints._RecordLast}"))
    # last.ckpt followed every epoch although val/loss never "improved" after epoch 0.
    assert _RecordLast.seen == [(0, STEPS, STEPS), (1, 2 * STEPS, 2 * STEPS)]
    last = read_checkpoint(first.last_ckpt)
    assert (last["epoch"], last["global_step"]) == (2, 3 * STEPS)
    assert int(last["optimizer_states"][0]["state"][0]["step"]) == 3 * STEPS
    assert first.best_ckpt.endswith("best-epoch000.ckpt")

    resumed = train(compose_train(*TINY, WORST_IS_BEST, "trainer.max_epochs=5",
                                  f"ckpt_path={first.last_ckpt}", f"output_dir={tmp_path}/2"))
    assert resumed.global_step == 5 * STEPS
    assert _steps(tmp_path / "2") == list(range(3 * STEPS, 5 * STEPS))  # epochs 3 and 4 only
    # The best is still epoch 0, from before the resume, now in the new run's folder.
    assert resumed.best_ckpt == str(tmp_path / "2" / "checkpoints" / "best-epoch000.ckpt")
    assert read_checkpoint(resumed.best_ckpt)["epoch"] == 0

    # Resuming from an epoch's end gives the very weights of a run that was never stopped.
    straight = train(compose_train(*TINY, WORST_IS_BEST, "trainer.max_epochs=5",
                                   f"output_dir={tmp_path}/3"))
    for name, value in _weights(straight.last_ckpt).items():
        torch.testing.assert_close(_weights(resumed.last_ckpt)[name], value, rtol=0, atol=0)


def test_a_lower_learning_rate_on_resume_is_the_rate_trained_at(compose_train, tmp_path):
    first = train(compose_train(*TINY, "trainer.max_epochs=1", "model.optimizer.lr=0.01"))
    overrides = ["model.optimizer.lr=0.001", "trainer.max_epochs=2"]
    resumed = train(compose_train(*TINY, *overrides, f"ckpt_path={first.last_ckpt}",
                                  f"output_dir={tmp_path}/2"), overrides=overrides)
    groups = read_checkpoint(resumed.last_ckpt)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [0.001]
    again = train(compose_train(*TINY, "trainer.max_epochs=2", f"ckpt_path={first.last_ckpt}",
                                f"output_dir={tmp_path}/3"), overrides=["trainer.max_epochs=2"])
    groups = read_checkpoint(again.last_ckpt)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [0.01]  # no override: the run's own rate


XOR = ["data=xor", "data.n_samples=200", "model.hidden_sizes=[6]", "model.activation=tanh",
       "callbacks=minimal", "trainer.num_sanity_val_steps=0", "trainer.max_epochs=2"]


@pytest.fixture
def xor_run(compose_train):
    return train(compose_train(*XOR))


def test_test_only_takes_data_and_model_from_the_checkpoint(compose_train, tmp_path, xor_run):
    cfg = compose_train("train=false", f"ckpt_path={xor_run.best_ckpt}",
                        f"output_dir={tmp_path}/test")
    again = train(cfg, overrides=["train=false", f"ckpt_path={xor_run.best_ckpt}"])
    assert again.metrics["test/acc"] == pytest.approx(xor_run.metrics["test/acc"])
    saved = (tmp_path / "test" / ".hydra" / "config.yaml").read_text()
    assert "XORDataModule" in saved and "activation: tanh" in saved

    net = load(xor_run.best_ckpt)  # the same network outside train.py
    assert isinstance(net, mb.MLP) and not net.training
    assert net.sizes == [2, 6, 1] and net.activation == "tanh"  # two classes: logistic head
    from manualbp.data import XORDataModule

    x, y = XORDataModule(n_samples=200).full_test_tensors()
    with torch.no_grad():
        accuracy = ((net(x)[:, 0] > 0).long() == y).float().mean().item()  # sigmoid(z) > 1/2
    assert accuracy == pytest.approx(xor_run.metrics["test/acc"], abs=1e-6)


@pytest.mark.parametrize(("override", "expected"), [
    ("model.activation=relu", "trained with model.activation=tanh, the command line asks for "
                              "model.activation=relu"),
    ("data=moons", "trained with data._target_=manualbp.data.XORDataModule, the command line "
                   "asks for data._target_=manualbp.data.MoonsDataModule"),
    ("data.noise=0.5", "trained with data.noise=0.25, the command line asks for data.noise=0.5"),
])
def test_an_override_that_disagrees_with_the_checkpoint_is_refused(compose_train, tmp_path,
                                                                   xor_run, override, expected):
    overrides = ["train=false", f"ckpt_path={xor_run.best_ckpt}", "data=xor", override]
    with pytest.raises(CheckpointError, match=expected):
        train(compose_train(*overrides, f"output_dir={tmp_path}/t"), overrides=overrides)


@pytest.mark.parametrize("count", ["num_features", "num_classes"])
def test_data_with_another_feature_or_class_count_is_refused(compose_train, tmp_path, xor_run,
                                                             count):
    ckpt = read_checkpoint(xor_run.best_ckpt)
    ckpt["hyper_parameters"][count] = 4  # as if trained on data of 4 features (classes)
    torch.save(ckpt, tmp_path / "four.ckpt")
    with pytest.raises(CheckpointError, match=f"trained on data with {count}=4, but data "
                                              f"'xor' has {count}=2"):
        train(compose_train("train=false", f"ckpt_path={tmp_path / 'four.ckpt'}",
                            f"output_dir={tmp_path}/t"))


def test_train_false_without_a_checkpoint_is_refused(compose_train):
    with pytest.raises(ValueError, match="train=false: expected ckpt_path=<file.ckpt> to test"):
        train(compose_train("train=false"))


def _broken_files(folder, good):
    data = good.read_bytes()
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "noise.ckpt").write_bytes(bytes(range(256)) * 10)
    torch.save({"weights": torch.ones(2)}, folder / "other.ckpt")
    torch.save({"state_dict": {}, "evil": L.Callback()}, folder / "objects.ckpt")
    return {"empty": "the file is empty", "truncated": "truncated or corrupt",
            "noise": "truncated or corrupt", "other": "expected a Lightning checkpoint",
            "objects": r"torch.load\(weights_only=True\) refused it \(it holds a "
                       r"lightning.pytorch.callbacks.callback.Callback object\)"}


def test_broken_checkpoint_files_get_one_line_naming_file_and_problem(compose_train, tmp_path,
                                                                      xor_run):
    for name, problem in _broken_files(tmp_path, Path(xor_run.last_ckpt)).items():
        path = tmp_path / f"{name}.ckpt"
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: .*{problem}") as info:
            train(compose_train(f"ckpt_path={path}", f"output_dir={tmp_path}/{name}"))
        assert "\n" not in str(info.value)
        if name != "other":  # the Trainer's own loads: the same weights_only file checks
            with pytest.raises(CheckpointError, match=problem):
                WeightsOnlyCheckpointIO().load_checkpoint(path)


def test_a_used_run_folder_is_refused_unless_the_run_continues_there(compose_train, tmp_path):
    first = train(compose_train(*TINY, "trainer.max_epochs=1"))
    with pytest.raises(RunFolderError, match=f"output_dir: {tmp_path} already holds a run .*"
                                             "continue that run with ckpt_path="):
        train(compose_train(*TINY, "trainer.max_epochs=1"))
    again = train(compose_train(*TINY, "trainer.max_epochs=2", f"ckpt_path={first.last_ckpt}"))
    assert again.global_step == 2 * STEPS
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["best-epoch000.ckpt", "last.ckpt"] or files == ["best-epoch001.ckpt",
                                                                     "last.ckpt"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / ".hydra" / "config-2.yaml").is_file()  # the first one is kept
    assert _steps(tmp_path) == list(range(2 * STEPS))  # one run's curve, carried on


def test_folder_problems_are_found_before_training(compose_train, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(RunFolderError, match=f"output_dir: {a_file} is an existing file"):
        train(compose_train(*TINY, f"output_dir={a_file}"))
    with pytest.raises(RunFolderError, match=f"checkpoint folder: cannot write to {a_file}/ckpt"):
        train(compose_train(*TINY, f"callbacks.model_checkpoint.dirpath={a_file}/ckpt",
                            f"output_dir={tmp_path}/run"))
    assert not list((tmp_path / "run").glob("events.*"))  # refused before anything ran


def test_gpu_trainer_without_a_gpu_names_trainer_cpu(compose_train, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="trainer.accelerator=gpu: expected a CUDA GPU.*"
                                         "trainer=cpu"):
        train(compose_train("trainer=gpu", *TINY))


def test_early_stopping_says_that_it_stopped_when_and_why(compose_train):
    quiet = [o for o in TINY if not o.startswith("callbacks=")]
    result = train(compose_train(*quiet, "callbacks=early_stopping", "callbacks.grad_check=null",
                                 "callbacks.layer_stats=null", "callbacks.hidden_embedding=null",
                                 "callbacks.decision_boundary=null", "trainer.max_epochs=10",
                                 "callbacks.early_stopping.patience=1",
                                 "callbacks.early_stopping.min_delta=100"))
    assert result.global_step == 2 * STEPS
    assert result.stop_reason == (
        "early stopping: val/loss did not improve by more than 100 for 1 epochs (best "
        f"{result.stop_reason.split('(best ')[1].split(')')[0]}); stopped after epoch 1 of "
        "trainer.max_epochs=10")


def test_fast_dev_run_writes_no_checkpoint_and_no_events(compose_train, tmp_path):
    train(compose_train("data=iris", "debug=fdr"))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.*"))
