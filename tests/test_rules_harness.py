"""Learning rules in the harness: model.rule, the align/ panels, MNIST-1D, the results table."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import manualbp as mb
from manualbp.lit import train
from manualbp.lit.alignment import alignment_metrics, angle
from manualbp.lit.module import initialise
from manualbp.lit.rules_table import REFERENCE, RulesTable, render

ROOT = Path(__file__).resolve().parents[1]
TINY = ["callbacks=minimal", "trainer.num_sanity_val_steps=0", "data=digits",
        "trainer.max_steps=6", "trainer.log_every_n_steps=2", "test=false"]


def _scalars(folder) -> set[str]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize("rule", ["feedback_alignment", "sign_symmetry", "kolen_pollack", "dfa"])
def test_every_rule_trains_and_draws_its_alignment(compose_train, tmp_path, rule):
    result = train(compose_train(*TINY, f"model.rule={rule}"))
    assert result.global_step == 6
    scalars = _scalars(tmp_path)
    assert {"align/delta_angle_1", "align/delta_angle_2"} <= scalars  # hidden layers [128, 64]
    assert "align/delta_angle_3" not in scalars  # the output layer's delta is the loss's
    if rule != "dfa":
        assert {"align/BW_angle_1", "align/BW_norm_ratio_3"} <= scalars


def test_backprop_draws_no_alignment(compose_train, tmp_path):
    train(compose_train(*TINY))
    assert not any(tag.startswith("align/") for tag in _scalars(tmp_path))


def test_a_rule_needs_the_manual_backend(compose_train, tmp_path):
    # Hydra wraps what LitMLP raises; the message is LitMLP's. Each run gets its own folder: a
    # run folder is never reused (issue 8), even by a run that failed before training.
    with pytest.raises(InstantiationException,
                       match="model.rule: expected backprop with backend=autograd"):
        train(compose_train(*TINY, "model.rule=fa", "model.backend=autograd",
                            f"output_dir={tmp_path / 'a'}"))
    with pytest.raises(InstantiationException, match="model.rule: unknown rule 'hebb'"):
        train(compose_train(*TINY, "model.rule=hebb", f"output_dir={tmp_path / 'b'}"))


def test_alignment_metrics_measure_what_they_say():
    torch.manual_seed(0)
    mlp = mb.MLP([4, 6, 3], rule="fa")
    x = torch.randn(5, 4)
    trace = mb.Trace()
    mlp(x, trace=trace).backward(torch.randn(5, 3))
    metrics = alignment_metrics(list(mlp.layers), trace)
    assert metrics["align/delta_angle_1"] == pytest.approx(
        angle(trace.delta[0], trace.delta_backprop[0]))
    assert 0 < metrics["align/delta_angle_1"] < 180
    with torch.no_grad():
        mlp.layers[0].feedback.copy_(2 * mlp.layers[0].weight)
    metrics = alignment_metrics(list(mlp.layers), trace)
    assert metrics["align/BW_angle_1"] == pytest.approx(0, abs=1e-4)
    assert metrics["align/BW_norm_ratio_1"] == pytest.approx(2)
    assert angle(torch.tensor([1.0, 0]), torch.tensor([0, 3.0])) == pytest.approx(90)


def test_mnist1d_is_generated_offline_as_published(monkeypatch):
    pytest.importorskip("mnist1d")
    import mnist1d.data

    from manualbp.data import MNIST1DDataModule
    from manualbp.data import mnist1d as ours

    def no_download(*args, **kwargs):
        raise AssertionError("MNIST-1D must never be downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    monkeypatch.setattr(mnist1d.data.requests, "get", no_download)
    monkeypatch.setattr(ours, "_CACHE", {})
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    published = MNIST1DDataModule(val_fraction=0)
    assert np.random.rand() == expected_next  # numpy's global generator is left as it was
    x, y = published.full_train_tensors()
    assert x.shape == (4000, 40) and published.full_test_tensors()[0].shape == (1000, 40)
    assert published.num_classes == 10 and torch.bincount(y).min() > 350
    held_out = MNIST1DDataModule()  # default: 10% of train validates
    assert len(held_out.full_train_tensors()[1]) == 3600
    assert len(held_out.full_val_tensors()[1]) == 400
    assert ours.checksum(ours.generate_mnist1d()) == ours.CHECKSUM


def test_mnist1d_refuses_data_that_differ_from_the_published_set(monkeypatch):
    pytest.importorskip("mnist1d")
    import mnist1d.data

    from manualbp.data import mnist1d as ours

    monkeypatch.setattr(ours, "_CACHE", {})
    fake = {k: np.zeros((2, 40) if k.startswith("x") else 2)
            for k in ("x", "y", "x_test", "y_test")}
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: fake)
    with pytest.raises(RuntimeError, match="mnist1d: expected the published data set"):
        ours.MNIST1DDataModule()


def _sweep(path, jobs, protocol="p", failed=0):
    """Run a RulesTable through a sweep of (rule, seed, test acc) jobs, then `failed` failures."""
    table = RulesTable(str(path), protocol=protocol)
    table.on_multirun_start(None)
    for rule, seed, acc in jobs:
        config = SimpleNamespace(model=SimpleNamespace(rule=rule), seed=seed)
        done = SimpleNamespace(status=SimpleNamespace(name="COMPLETED"),
                               return_value=SimpleNamespace(metrics={"test/acc": acc},
                                                            global_step=10))
        table.on_job_start(config)
        table.on_job_end(config, done)
    config = SimpleNamespace(model=SimpleNamespace(rule="backprop"), seed=9)
    for _ in range(failed):
        table.on_job_end(config, SimpleNamespace(status=SimpleNamespace(name="FAILED"),
                                                 return_value=None))
    table.on_multirun_end(None)
    return json.loads(path.read_text()) if path.exists() else None


def test_rules_table_gathers_a_sweep_into_one_file(tmp_path):
    path = tmp_path / "out" / "rules.json"
    data = _sweep(path, [("backprop", 1, 0.67), ("backprop", 2, 0.69), ("dfa_x", 1, 0.5)],
                  failed=1)
    assert len(data["runs"]) == 3
    assert data["summary"]["backprop"]["mean"] == pytest.approx(68.0)
    assert data["summary"]["backprop"]["reference"] == REFERENCE["backprop"]
    assert "| backprop | 68.0% (1.4) | 2 | 67.3% | +0.7 |" in render(data)


def test_a_sweep_of_some_rules_replaces_only_their_runs(tmp_path):
    path = tmp_path / "rules.json"
    _sweep(path, [("backprop", 1, 0.67), ("dfa_x", 1, 0.5), ("dfa_x", 2, 0.6), ("kp_x", 1, 0.4)])
    data = _sweep(path, [("dfa_x", 2, 0.7), ("new_x", 1, 0.2), ("bp", 3, 0.66)])
    runs = [(r["rule"], r["seed"], round(r["test_acc"])) for r in data["runs"]]
    assert runs == [("backprop", 3, 66), ("dfa_x", 2, 70), ("kp_x", 1, 40), ("new_x", 1, 20)]
    assert data["summary"]["dfa_x"]["n"] == 1 and data["summary"]["backprop"]["n"] == 1
    before = path.read_text()
    assert _sweep(path, [], failed=2) is not None and path.read_text() == before  # kept as it was
    data = _sweep(path, [("dfa_x", 1, 0.1)], protocol="another")
    assert [r["rule"] for r in data["runs"]] == ["dfa_x"]  # another protocol: replaced whole
    assert _sweep(tmp_path / "none.json", [], failed=1) is None


def test_readme_table_is_the_committed_results_file():
    data = json.loads((ROOT / "benchmarks" / "results" / "rules_mnist1d.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- rules_mnist1d table -->\n(.*?)\n<!-- end -->", readme, re.S)
    assert block is not None, "README.md lost its rules_mnist1d table markers"
    assert block.group(1) == render(data)
    assert len(data["runs"]) == 15 and {r["seed"] for r in data["runs"]} == {1, 2, 3}


@pytest.mark.parametrize("init", ["he", "xavier", "torch"])
def test_dfas_D_is_drawn_like_FAs_B_with_fan_in_n_i(init):
    """D[i] (n_L, n_i) is drawn as FA's B would be in that shape: fan_in n_i, the width the
    error lands in (so the last hidden layer's D and FA's output-layer B are alike, and DFA's
    error has backprop's size at init), not n_L; normal under he/xavier, nn.Linear's uniform
    under torch. benchmarks/dfa_feedback.py measures what other draws do to MNIST-1D."""
    sizes = [40, 256, 256, 10]
    spread = []
    for rule in ("dfa", "fa"):
        torch.manual_seed(0)
        mlp = mb.MLP(sizes, rule=rule)
        initialise(mlp.layers, init)
        spread.append([getattr(layer, "feedback", None) for layer in mlp.layers])
    (D1, D2, D3), (_, _, B3) = spread
    assert D3 is None and D1.shape == D2.shape == B3.shape == (10, 256)
    n_L, n_i = 10, 256
    want = {"he": (2 / n_i) ** 0.5, "xavier": (2 / (n_L + n_i)) ** 0.5,
            "torch": (1 / (3 * n_i)) ** 0.5}[init]
    for M in (D1, D2, B3):
        assert M.std().item() == pytest.approx(want, rel=0.05)
        assert abs(M.mean().item()) < 0.1 * want
        tail = (M.abs() > 2 * want).float().mean().item()  # normal: 4.6%, uniform: none
        assert (0.02 < tail < 0.08) if init != "torch" else tail == 0
    assert not torch.equal(D1, D2)  # every hidden layer has its own D


def test_the_rules_experiment_is_the_published_protocol(compose_train):
    cfg = compose_train("experiment=rules_mnist1d")
    assert cfg.data._target_.endswith("MNIST1DDataModule") and cfg.data.val_fraction == 0
    assert cfg.model.hidden_sizes == [256, 256] and cfg.model.init == "he"
    opt = cfg.model.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.weight_decay) == (
        "torch.optim.SGD", 0.05, 0.9, 0.0001)
    assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 60
    assert cfg.callbacks.model_checkpoint.monitor is None  # the last weights are tested
    for name, callback in cfg.callbacks.items():  # each one builds (a bad key fails every job)
        assert callback is None or hydra.utils.instantiate(callback) is not None, name


def _dfa_feedback():
    spec = importlib.util.spec_from_file_location("dfa_feedback",
                                                  ROOT / "benchmarks" / "dfa_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dfa_feedback_script_checks_dfa_and_measures_each_draw(tmp_path):
    out = tmp_path / "dfa.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dfa_feedback.py"), "--variants",
                    "he_n_i", "he_n_L", "backprop", "--seeds", "1", "--epochs", "1", "--out",
                    str(out)], check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["he_n_i"]["D_std"] == pytest.approx([(2 / 256) ** 0.5] * 2, rel=0.05)
    assert runs["he_n_L"]["D_std"] == pytest.approx([(2 / 10) ** 0.5] * 2, rel=0.05)
    assert runs["he_n_i"]["error_size_at_init"] == pytest.approx([1, 1], abs=0.1)
    assert runs["he_n_L"]["error_size_at_init"] == pytest.approx([5, 5], rel=0.1)
    assert runs["backprop"]["error_size_at_init"] is None
    assert all(0 < r["test_acc"] < 100 for r in runs.values())


def test_readme_dfa_draws_table_is_the_committed_results_file():
    data = json.loads((ROOT / "benchmarks" / "results" / "dfa_feedback.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- dfa_feedback table -->\n(.*?)\n<!-- end -->", readme, re.S)
    assert block is not None, "README.md lost its dfa_feedback table markers"
    assert block.group(1) == _dfa_feedback().render(data)
    assert {r["seed"] for r in data["runs"]} == set(range(1, 11)) and data["epochs"] == 60
