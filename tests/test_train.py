"""train(cfg) end to end: every data set, the TensorBoard panels, resume, backends, DDP."""

import csv
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.multiprocessing.spawn import ProcessExitedException

from manualbp.lit import CheckpointError, train, user_message

TINY = ["callbacks=minimal", "trainer.num_sanity_val_steps=0"]
SKLEARN_AND_2D = ["digits", "iris", "wine", "breast_cancer", "xor", "moons", "circles", "spirals"]


def _write_idx(path, array: torch.Tensor) -> None:
    """An uncompressed IDX file of uint8 data: magic 00 00 08 ndim, sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def _tiny_mnist(folder, n_train=40, n_test=10):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g)
        _write_idx(folder / f"{split}-images-idx3-ubyte", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    return folder


def _tiny_csv(path, regression=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "c", "label"])
        for i, row in enumerate(x.tolist()):
            label = f"{sum(row):.4f}" if regression else ["cat", "dog", "fox"][i % 3]
            writer.writerow([*row, label])
    return path


def _events(folder) -> EventAccumulator:
    guidance = {kind: 0 for kind in ("scalars", "histograms", "images", "tensors",
                                     "compressedHistograms", "audio")}
    accumulator = EventAccumulator(str(folder), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("data", SKLEARN_AND_2D)
def test_fast_dev_run_on_every_bundled_data_set(compose_train, data):
    result = train(compose_train(f"data={data}", "debug=fdr"))
    assert "test/acc" in result.metrics and result.global_step == 1


@pytest.mark.parametrize("data", ["mnist", "fashion_mnist"])
def test_fast_dev_run_on_local_idx_files(compose_train, tmp_path, data):
    folder = tmp_path / "idx"
    folder.mkdir()
    _tiny_mnist(folder)
    result = train(compose_train(f"data={data}", f"data.path={folder}", "debug=fdr"))
    assert 0.0 <= result.metrics["test/acc"] <= 1.0


@pytest.mark.parametrize(("task", "metric"), [("multiclass", "test/acc"),
                                              ("regression", "test/mse")])
def test_fast_dev_run_on_a_csv_file(compose_train, tmp_path, task, metric):
    path = _tiny_csv(tmp_path / "rows.csv", regression=task == "regression")
    result = train(compose_train("data=csv", f"data.path={path}", f"data.task={task}",
                                 "debug=fdr"))
    assert metric in result.metrics


def test_missing_data_path_reaches_the_user_as_one_line(compose_train, tmp_path):
    with pytest.raises(Exception) as info:
        train(compose_train("data=mnist", f"data.path={tmp_path / 'no_such_folder'}"))
    message = user_message(info.value)
    assert "no_such_folder" in message and "t10k-labels-idx1-ubyte" in message
    assert "\n" not in message


def test_a_class_count_that_disagrees_with_the_model_names_both(compose_train):
    with pytest.raises(Exception) as info:
        train(compose_train("model.sizes=[64,32,5]", "debug=fdr"))
    message = user_message(info.value)
    assert "10 classes" in message and "[64, 32, 5]" in message


def test_a_short_run_fills_every_tensorboard_panel(compose_train, tmp_path):
    cfg = compose_train("data=xor", "model.hidden_sizes=[32,16]", "model.optimizer.lr=0.01",
                        "trainer.max_epochs=2",
                        "trainer.log_every_n_steps=1", "callbacks.grad_check.every_n_steps=5",
                        "callbacks.layer_stats.histogram_every_n_steps=5")
    result = train(cfg)
    events = _events(tmp_path)
    tags = events.Tags()
    scalars = set(tags["scalars"])
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc",
                 "test/loss", "check/grad_rel_err", "hp/val_acc_best", "hp/test_acc"):
        assert name in scalars, name
    for i in (1, 2, 3):
        assert {f"grad_norm/W{i}", f"delta/mean_abs_{i}"} <= scalars
        assert {f"weights/W{i}", f"gradients/W{i}", f"activations/a{i}"} <= set(tags["histograms"])
    assert len(events.Scalars("delta/mean_abs_1")) == result.global_step  # every logging step
    val_acc = [e.value for e in events.Scalars("val/acc")]
    assert [e.value for e in events.Scalars("val/acc_best")] == [
        max(val_acc[: i + 1]) for i in range(len(val_acc))]
    assert result.metrics["test/acc"] > 0.9  # xor is easy with two hidden layers
    assert max(e.value for e in events.Scalars("check/grad_rel_err")) < 1e-5
    assert [e.value for e in events.Scalars("hp/test_acc")][-1] == pytest.approx(
        result.metrics["test/acc"])
    assert len(events.Images("decision_boundary")) == 2  # one per epoch
    projector = (tmp_path / "projector_config.pbtxt").read_text()
    assert "val_last_hidden" in projector and "metadata.tsv" in projector
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model/hidden_sizes"].string_value == "[32, 16]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {"hp/val_acc_best",
                                                                       "hp/test_acc"}


def test_no_decision_boundary_for_data_that_is_not_2d(compose_train, tmp_path):
    train(compose_train("data=iris", "trainer.max_epochs=1"))
    assert "decision_boundary" not in _events(tmp_path).Tags()["images"]


def test_resume_from_last_checkpoint_continues_the_step_count(compose_train, tmp_path):
    every_step = [*TINY, "data=iris", "test=false", "trainer.log_every_n_steps=1"]
    first = train(compose_train(*every_step, "trainer.max_epochs=2"))
    steps_per_epoch = first.global_step // 2
    assert first.last_ckpt is not None
    resumed = train(compose_train(*every_step, "trainer.max_epochs=3",
                                  f"ckpt_path={first.last_ckpt}", f"output_dir={tmp_path}/2"))
    assert resumed.global_step == 3 * steps_per_epoch
    steps = [e.step for e in _events(tmp_path / "2").Scalars("train/loss")]
    assert len(steps) == steps_per_epoch  # only the third epoch was trained
    assert min(steps) >= first.global_step  # the curve carries on where it stopped


def test_test_only_evaluates_the_given_checkpoint(compose_train, tmp_path):
    first = train(compose_train("data=iris", *TINY, "trainer.max_epochs=3"))
    again = train(compose_train("data=iris", *TINY, "train=false", f"ckpt_path={first.best_ckpt}",
                                f"output_dir={tmp_path}/2"))
    assert again.metrics["test/acc"] == pytest.approx(first.metrics["test/acc"])


def test_a_missing_checkpoint_is_refused_before_training(compose_train, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.ckpt: expected an existing .ckpt file"):
        train(compose_train(f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def _losses(compose_train, tmp_path, backend, *overrides):
    cfg = compose_train("data=digits", *TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                        f"model.backend={backend}", "test=false", *overrides,
                        f"output_dir={tmp_path}/{backend}")
    train(cfg)
    return torch.tensor([e.value for e in _events(tmp_path / backend).Scalars("train/loss")])


@pytest.mark.parametrize(("precision", "rtol"), [("64", 1e-12), ("32", 1e-5)])
def test_manual_and_autograd_backends_overlay_in_tensorboard(compose_train, tmp_path, precision,
                                                             rtol):
    manual = _losses(compose_train, tmp_path, "manual", f"trainer.precision={precision}")
    autograd = _losses(compose_train, tmp_path, "autograd", f"trainer.precision={precision}")
    assert len(manual) == len(autograd) == 8
    assert manual[-1] < manual[0]
    torch.testing.assert_close(autograd, manual, rtol=rtol, atol=0)


def _delta_ratio(compose_train, tmp_path, experiment):
    """mean|delta| of the first layer over the last, averaged over the first steps."""
    cfg = compose_train(f"experiment={experiment}", "trainer.max_steps=10",
                        "trainer.log_every_n_steps=1", "test=false",
                        f"output_dir={tmp_path}/{experiment}")
    train(cfg)
    events = _events(tmp_path / experiment)
    first = sum(e.value for e in events.Scalars("delta/mean_abs_1"))
    last = sum(e.value for e in events.Scalars("delta/mean_abs_9"))
    return first / last


def test_deep_sigmoid_deltas_vanish_and_deep_relu_deltas_do_not(compose_train, tmp_path):
    sigmoid = _delta_ratio(compose_train, tmp_path, "vanishing_sigmoid")
    relu = _delta_ratio(compose_train, tmp_path, "deep_relu")
    assert sigmoid < 1e-4  # g' <= 1/4 at each of 8 layers
    assert relu > 0.05  # He init and g' = 1: delta keeps its order of magnitude


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run_with_synced_metrics(compose_train, tmp_path):
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"  # a run folder is never reused (issue 8)
        cfg = compose_train("trainer=ddp_cpu", "data=iris", "trainer.max_epochs=2",
                            "trainer.log_every_n_steps=1", "callbacks.grad_check.every_n_steps=1",
                            f"output_dir={out}")
        try:
            result = train(cfg)
            break
        except ProcessExitedException as err:
            # Now and then a spawned worker aborts in gloo's thread teardown at interpreter exit,
            # after its work is done ("terminate called without an active exception"): a torch
            # teardown fault, not ours (tests/test_ddp.py sidesteps it with os._exit). One more
            # try, in a fresh folder; a second abort, or any other failure, fails the test.
            if attempt == 1 or err.signal_name != "SIGABRT":
                raise
    # 105 training rows over 2 ranks in batches of 32: 2 steps per epoch on each rank.
    assert result.global_step == 4
    assert 0.0 <= result.metrics["test/acc"] <= 1.0 and "val/acc_best" in result.metrics
    events = _events(out)
    assert len(events.Scalars("delta/mean_abs_1")) == 4  # rank zero alone logs
    # The trained gradients are averaged over the ranks; so must the reference be.
    assert max(e.value for e in events.Scalars("check/grad_rel_err")) < 1e-5
    assert (out / "projector_config.pbtxt").read_text().count("embeddings {") == 1
    assert (out / "checkpoints" / "last.ckpt").is_file()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("precision", "max_err"), [("32", 1e-5), ("bf16-mixed", 0.1)])
def test_gpu_run_with_a_live_gradient_check(compose_train, tmp_path, precision, max_err):
    result = train(compose_train("trainer=gpu", f"trainer.precision={precision}", "data=xor",
                                 "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                                 "callbacks.grad_check.every_n_steps=5"))
    assert result.metrics["test/acc"] > 0.9
    errors = [e.value for e in _events(tmp_path).Scalars("check/grad_rel_err")]
    print(f"{precision}: check/grad_rel_err max {max(errors):.3g}")
    assert max(errors) < max_err


@pytest.mark.cuda
@needs_cuda
def test_gpu_backends_overlay(compose_train, tmp_path):
    manual = _losses(compose_train, tmp_path, "manual", "trainer=gpu")
    autograd = _losses(compose_train, tmp_path, "autograd", "trainer=gpu")
    torch.testing.assert_close(autograd, manual, rtol=1e-5, atol=0)


def test_the_sgd_preset_learns_digits(compose_train):
    # At lr 0.1 with momentum 0.9 it collapsed to chance (about 0.1) on the unscaled pixels.
    result = train(compose_train("model=mlp_sgd", "callbacks=minimal", "trainer.max_epochs=4",
                                 "trainer.num_sanity_val_steps=0"))
    assert result.metrics["test/acc"] > 0.9
