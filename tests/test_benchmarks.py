"""Smoke test of the benchmark script: it runs end to end and its own checks hold.

Speed is never asserted here (no wall-clock bounds in tests); what is asserted is what the
benchmark verifies besides speed: every manualbp variant's loss and gradients match autograd's,
and it never saves more for backward than autograd.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def _benchmark(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package), imported by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_quick_benchmark_runs_and_its_checks_hold(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-sklearn",
         "--sizes", "2,32,32,2", "64,128,10@16", "--activations", "relu", "tanh", "--no-fallback",
         "--out", str(out)],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert len(result["configs"]) == 4
    for config in result["configs"]:
        variants = config["variants"]
        assert set(variants) >= {"autograd", "per_layer", "natural", "mlp", "backprop"}
        assert config["per_layer_source"] == "manualbp.convert"
        assert variants["backprop"]["saved"] == {"all": 0, "new": 0}  # no graph at all
        for name in ("per_layer", "natural", "mlp", "backprop"):
            assert variants[name]["check"]["grad_rel_err"] <= 1e-5, (name, config["sizes"])
            assert variants[name]["check"]["loss_rel_err"] <= 1e-6, (name, config["sizes"])
            assert variants[name]["saved"]["new"] <= variants["autograd"]["saved"]["new"]
            assert variants[name]["step"]["median_s"] > 0
    assert out.with_suffix(".md").read_text().startswith("Machine:")


@pytest.mark.slow
def test_per_example_benchmark_runs_and_its_checks_hold(tmp_path):
    out = tmp_path / "pe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "per_example.py"), "--tiny",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True,
                   timeout=300)
    result = json.loads(out.read_text())
    assert [c["label"] for c in result["configs"]] == ["20-16-16-5 b8", "block d16 T4 b4"]
    for config in result["configs"]:
        mine = [n for n in config["ratio"] if n.split("/")[-1] in ("per_layer", "mlp",
                                                                    "backprop")]
        assert mine and all(config["ratio"][n] > 0 for n in mine)
        for name in mine:  # float32 against vmap(grad)
            assert config["errors"][name]["norms"] <= 1e-5, (name, config["label"])
            if name.startswith("clip/"):
                assert config["errors"][name]["clip"] <= 1e-5, (name, config["label"])
    memory = result["configs"][0]["memory"]
    for name in ("clip/per_layer", "clip/mlp", "clip/backprop"):
        assert memory[name]["extra_bytes"] <= memory["bound_bytes"], name


@pytest.mark.slow
def test_digits_breakdown_times_every_part_of_the_loop():
    pytest.importorskip("sklearn")
    digits = _benchmark("digits")
    result = digits.breakdown(1, kinds=("natural", "backprop"))
    assert result["steps"] == 60 * 22  # 1347 training digits in batches of 64, the last short
    for kind in ("natural", "backprop"):
        parts = result[kind]
        assert set(parts) == set(digits.PARTS)
        assert all(v >= 0 for v in parts.values()), (kind, parts)
        assert parts["forward+backward"] > 0 and parts["adam"] > 0


def test_adam_cost_runs_every_case():
    pytest.importorskip("sklearn")
    digits = _benchmark("digits")
    result = digits.adam_cost(rounds=1, steps=3, adam={"fused": True})
    assert set(result) == {"hot", "fresh grads", "after autograd", "after natural",
                           "after backprop"}
    assert all(v > 0 for v in result.values()), result


def test_zero_digits_repeats_skips_the_digits_runs_and_a_negative_count_is_refused():
    run = _benchmark("run")
    assert run.parse_args(["--digits-repeats", "0"]).no_sklearn  # not a median of no runs
    assert not run.parse_args(["--digits-repeats", "2"]).no_sklearn
    with pytest.raises(SystemExit):
        run.parse_args(["--digits-repeats", "-1"])
