"""In-memory data modules: scikit-learn sets and generated 2-D sets.

File-backed modules: test_data_idx.py (MNIST) and test_data_csv.py.
"""

import math
import pickle

import lightning as L
import pytest
import torch
from sklearn import datasets
from torch import nn

from manualbp.data import (
    DATAMODULES,
    BreastCancerDataModule,
    CirclesDataModule,
    DigitsDataModule,
    IrisDataModule,
    MoonsDataModule,
    SpiralsDataModule,
    TensorDataModule,
    WineDataModule,
    XORDataModule,
)

# class, rows in all, num_features, num_classes, task, is_2d
CASES = [
    (DigitsDataModule, 1797, 64, 10, "multiclass", False),
    (IrisDataModule, 150, 4, 3, "multiclass", False),
    (WineDataModule, 178, 13, 3, "multiclass", False),
    (BreastCancerDataModule, 569, 30, 2, "binary", False),
    (XORDataModule, 1000, 2, 2, "binary", True),
    (MoonsDataModule, 1000, 2, 2, "binary", True),
    (CirclesDataModule, 1000, 2, 2, "binary", True),
    (SpiralsDataModule, 1000, 2, 3, "multiclass", True),
]
IDS = [case[0].name for case in CASES]


def _splits(dm: TensorDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.full_train_tensors(), dm.full_val_tensors(), dm.full_test_tensors()]


@pytest.mark.parametrize(("cls", "n", "features", "classes", "task", "is_2d"), CASES, ids=IDS)
def test_interface_shapes_and_dtypes(cls, n, features, classes, task, is_2d):
    dm = cls()
    assert (dm.num_features, dm.num_classes, dm.task, dm.is_2d) == (features, classes, task, is_2d)
    assert len(dm.class_names) == classes
    assert len(dm.feature_names) == features
    assert dm.mean.shape == dm.std.shape == (features,)
    assert dm.mean.dtype == dm.std.dtype == torch.float32
    total = 0
    for x, y in _splits(dm):
        assert x.dtype == torch.float32 and x.shape == (y.shape[0], features)
        assert y.dtype == torch.int64 and y.ndim == 1
        assert 0 <= int(y.min()) and int(y.max()) < classes
        assert torch.isfinite(x).all()
        total += y.shape[0]
    assert total == n


@pytest.mark.parametrize(("cls", "n"), [(case[0], case[1]) for case in CASES], ids=IDS)
def test_split_sizes_disjoint_and_seeded(cls, n):
    dm = cls(seed=3, val_fraction=0.2, test_fraction=0.1)
    parts = [dm.train_indices, dm.val_indices, dm.test_indices]
    assert [len(p) for p in parts] == [
        n - round(0.2 * n) - round(0.1 * n),
        round(0.2 * n),
        round(0.1 * n),
    ]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))  # disjoint, complete
    again = cls(seed=3, val_fraction=0.2, test_fraction=0.1)
    for (x, y), (x2, y2) in zip(_splits(dm), _splits(again), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = cls(seed=4, val_fraction=0.2, test_fraction=0.1)
    assert not torch.equal(dm.val_indices, other.val_indices)


@pytest.mark.parametrize("cls", [case[0] for case in CASES], ids=IDS)
def test_standardisation_fitted_on_train_only(cls):
    dm, raw = cls(seed=1), cls(seed=1, standardize=False)
    assert torch.equal(raw.mean, torch.zeros(raw.num_features))
    assert torch.equal(raw.std, torch.ones(raw.num_features))
    (x_train, _), (x_val, _), (x_test, _) = _splits(dm)
    (raw_train, _), (raw_val, _), (raw_test, _) = _splits(raw)
    torch.testing.assert_close(dm.mean, raw_train.double().mean(0).float())
    varying = raw_train.std(0) > 0
    torch.testing.assert_close(x_train.mean(0), torch.zeros(dm.num_features), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        x_train.std(0, correction=0)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0
    )
    assert torch.equal(dm.std[~varying], torch.ones(int((~varying).sum())))
    for x, x_raw in [(x_val, raw_val), (x_test, raw_test)]:
        torch.testing.assert_close(x, (x_raw - dm.mean) / dm.std)
    # the val split keeps its own offset: only the training rows were centred
    assert x_val.mean(0).abs().max() > 1e-3


def test_digits_values_and_default_split():
    dm = DigitsDataModule(standardize=False)
    bunch = datasets.load_digits()
    x, y = dm.full_test_tensors()
    assert 200 <= len(y) <= 500
    assert torch.equal(x, torch.as_tensor(bunch.data[dm.test_indices.numpy()], dtype=torch.float32))
    assert torch.equal(y, torch.as_tensor(bunch.target[dm.test_indices.numpy()]))
    assert dm.class_names == [str(d) for d in range(10)]
    # pixel (0, 0) is blank in every digit: its std is guarded, so it stays 0 instead of NaN
    standardised = DigitsDataModule()
    assert standardised.std[0] == 1.0 and (standardised.full_train_tensors()[0][:, 0] == 0).all()


def test_breast_cancer_is_binary_with_class_indices():
    dm = BreastCancerDataModule()
    assert dm.class_names == ["malignant", "benign"]
    assert set(dm.full_train_tensors()[1].unique().tolist()) == {0, 1}


@pytest.mark.parametrize("batch_size", [1, 32, 500])
def test_dataloaders_batches(batch_size):
    dm = IrisDataModule(batch_size=batch_size)
    loaders = {
        "train": (dm.train_dataloader(), dm.full_train_tensors()),
        "val": (dm.val_dataloader(), dm.full_val_tensors()),
        "test": (dm.test_dataloader(), dm.full_test_tensors()),
        "predict": (dm.predict_dataloader(), dm.full_test_tensors()),
    }
    for split, (loader, (x, y)) in loaders.items():
        batches = list(loader)
        sizes = [len(b[1]) for b in batches]
        assert sizes == [batch_size] * (len(y) // batch_size) + (
            [len(y) % batch_size] if len(y) % batch_size else []
        ), split
        xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        if split == "train":  # shuffled: same rows, other order
            assert torch.equal(xs[:, 0].sort().values, x[:, 0].sort().values)
        else:
            assert torch.equal(xs, x) and torch.equal(ys, y)


def test_train_loader_shuffles_and_workers_run():
    dm = DigitsDataModule(batch_size=2000, num_workers=1)
    ((x_batch, _),) = list(dm.train_dataloader())
    assert not torch.equal(x_batch, dm.full_train_tensors()[0])
    assert dm.train_dataloader().num_workers == 1


@pytest.mark.parametrize("cls", [WineDataModule, SpiralsDataModule])
def test_setup_and_pickle_keep_the_split(cls):
    """Per-rank setup() and a ddp_spawn pickle must leave every split as it was."""
    dm = cls(seed=7)
    before = [t.clone() for pair in _splits(dm) for t in pair]
    for stage in ("fit", "validate", "test", "predict"):
        dm.prepare_data()
        dm.setup(stage)
    copy = pickle.loads(pickle.dumps(dm))
    for module in (dm, copy):
        after = [t for pair in _splits(module) for t in pair]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class _TinyClassifier(L.LightningModule):
    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Linear(num_features, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own pytree shim, not ours
def test_runs_under_a_lightning_trainer(tmp_path):
    dm = SpiralsDataModule(n_samples=300, batch_size=50)
    model = _TinyClassifier(dm.num_features, dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    predictions = torch.cat(trainer.predict(model, datamodule=dm))
    assert predictions.shape == dm.full_test_tensors()[1].shape


def test_registry_names_every_module():
    assert set(DATAMODULES) == {
        "digits",
        "iris",
        "wine",
        "breast_cancer",
        "xor",
        "moons",
        "circles",
        "spirals",
        "mnist",
        "fashion_mnist",
        "mnist1d",
        "csv",
    }
    assert all(cls.name == name for name, cls in DATAMODULES.items())


# ---- generated sets: geometry ------------------------------------------------------------


def _raw_all(dm: TensorDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([pair[0] for pair in _splits(dm)])
    return x, torch.cat([pair[1] for pair in _splits(dm)])


def test_xor_blobs_sit_on_the_corners_with_xor_labels():
    x, y = _raw_all(XORDataModule(noise=0.0, standardize=False))
    assert set(map(tuple, x.tolist())) == {(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)}
    assert torch.equal(y, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long())
    assert y.bincount().tolist() == [500, 500]
    x, y = _raw_all(XORDataModule(noise=0.25, standardize=False))
    agree = (y == ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()).float().mean()
    assert 0.95 < agree < 1.0  # noisy, but the quadrant still decides almost every label


def test_moons_lie_on_two_half_circles():
    x, y = _raw_all(MoonsDataModule(n_samples=200, noise=0.0, standardize=False))
    upper, lower = x[y == 0], x[y == 1]
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(100))
    assert (upper[:, 1] >= 0).all()
    shifted = torch.stack([1.0 - lower[:, 0], 0.5 - lower[:, 1]], dim=1)
    torch.testing.assert_close(shifted.norm(dim=1), torch.ones(100))
    assert (lower[:, 1] <= 0.5).all()


def test_circles_radii():
    x, y = _raw_all(CirclesDataModule(n_samples=200, noise=0.0, factor=0.3, standardize=False))
    torch.testing.assert_close(x[y == 0].norm(dim=1), torch.ones(100))
    torch.testing.assert_close(x[y == 1].norm(dim=1), torch.full((100,), 0.3))


@pytest.mark.parametrize("arms", [2, 3, 5])
def test_spiral_arms_follow_their_angle(arms):
    dm = SpiralsDataModule(n_samples=600, noise=0.0, num_classes=arms, turns=1.5, standardize=False)
    x, y = _raw_all(dm)
    assert dm.task == ("binary" if arms == 2 else "multiclass")
    assert y.bincount().tolist() == [600 // arms] * arms
    r = x.norm(dim=1)
    expected = 2 * math.pi * (y / arms + 1.5 * r)
    gap = torch.remainder(torch.atan2(x[:, 1], x[:, 0]) - expected + math.pi, 2 * math.pi)
    torch.testing.assert_close(gap, torch.full_like(gap, math.pi), atol=1e-4, rtol=0)


def test_generated_data_depends_on_the_seed():
    a, b = XORDataModule(seed=0), XORDataModule(seed=1)
    assert not torch.equal(_raw_all(a)[0].sort(0).values, _raw_all(b)[0].sort(0).values)


# ---- bad arguments: one clear message each ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"val_fraction": 0.0},
            r"digits: expected 0 < val_fraction < 1, 0 < test_fraction < 1 "
            r"and val_fraction \+ test_fraction < 1, got val_fraction=0.0, "
            r"test_fraction=0.15",
        ),
        ({"val_fraction": 1.2}, r"got val_fraction=1.2, test_fraction=0.15"),
        ({"test_fraction": -0.1}, r"got val_fraction=0.15, test_fraction=-0.1"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction=0.5, test_fraction=0.5"),
        ({"val_fraction": "0.2"}, r"got val_fraction='0.2'"),
        ({"batch_size": 0}, r"digits: expected batch_size to be an int >= 1, got 0"),
        ({"batch_size": 8.0}, r"expected batch_size to be an int >= 1, got 8.0"),
        ({"num_workers": -1}, r"digits: expected num_workers to be an int >= 0, got -1"),
        ({"seed": -1}, r"digits: expected seed to be an int >= 0, got -1"),
    ],
)
def test_bad_common_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (
            XORDataModule,
            {"num_classes": 3},
            r"xor: expected num_classes=2 \(the set has two "
            r"classes by construction\), got 3; use spirals",
        ),
        (MoonsDataModule, {"num_classes": 4}, r"moons: expected num_classes=2 .* got 4"),
        (
            CirclesDataModule,
            {"num_classes": 1},
            r"circles: expected num_classes to be an int "
            r">= 2, got 1",
        ),
        (
            SpiralsDataModule,
            {"num_classes": 1},
            r"spirals: expected num_classes to be an int "
            r">= 2, got 1",
        ),
        (
            SpiralsDataModule,
            {"n_samples": 4, "num_classes": 5},
            r"spirals: expected n_samples >= num_classes=5, got 4",
        ),
        (XORDataModule, {"n_samples": 0}, r"xor: expected n_samples to be an int >= 1, got 0"),
        (
            MoonsDataModule,
            {"noise": -0.1},
            r"moons: expected noise to be a finite float >= 0, "
            r"got -0.1",
        ),
        (MoonsDataModule, {"noise": float("nan")}, r"got nan"),
        (CirclesDataModule, {"factor": 1.0}, r"circles: expected 0 < factor < 1, got 1.0"),
        (SpiralsDataModule, {"turns": 0}, r"spirals: expected a finite turns > 0, got 0"),
        (
            XORDataModule,
            {"n_samples": 3},
            r"xor: expected at least one row in each split, got 3 rows -> train=3, val=0, test=0; "
            r"use more samples or other fractions",
        ),
    ],
)
def test_bad_generator_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
