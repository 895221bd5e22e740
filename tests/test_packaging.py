"""Packaging: the core works with torch alone; pyproject and LICENSE agree."""

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ["lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "tensorboard",
           "hydra", "omegaconf", "sklearn", "numpy"]

# Run in a fresh interpreter: an import hook refuses the harness's packages (and numpy, which
# the torch wheel does not require), then the core is used end to end.
SCRIPT = f"""
import sys
BLOCKED = {HARNESS!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
        return None

sys.meta_path.insert(0, Block())
import torch
import manualbp as mb
from torch import nn

x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
mlp = mb.MLP([5, 7, 3])
mlp.loss(x, y)[0].backward()
mlp.backprop(x, y)
model = mb.convert(nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)))
loss = mb.softmax_cross_entropy(model(x), y) + mb.mse_loss(model(x), torch.zeros(8, 3))
loss = loss + mb.sigmoid_binary_cross_entropy(model(x), torch.rand(8, 3))
loss.backward()
mb.unconvert(model)
assert type(model[0]) is nn.Linear
loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
assert not loaded, loaded
print("core ok")
"""


def test_core_imports_and_works_without_the_harness_packages():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("core ok")


def test_dependencies_are_torch_only_and_the_harness_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    train = " ".join(project["optional-dependencies"]["train"])
    for name in ("lightning", "torchmetrics", "tensorboard", "hydra-core", "scikit-learn"):
        assert name in train
    assert any(d.startswith("onnxruntime") for d in project["optional-dependencies"]["dev"])
    assert '".[train,dev]"' in (ROOT / "Makefile").read_text()


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "LICENSE").read_text()
    assert project["license"] == "MIT" and text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text
