"""The small tabular sets bundled with scikit-learn (read from its package, never downloaded)."""

from collections.abc import Callable

import torch
from sklearn import datasets

from manualbp.data.base import TensorDataModule


class _SklearnDataModule(TensorDataModule):
    """Loads one ``sklearn.datasets.load_*`` set; subclasses only name the loader and task."""

    _load: Callable = staticmethod(datasets.load_digits)
    _task = "multiclass"

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, val_fraction, test_fraction, standardize)
        bunch = self._load()
        x = torch.as_tensor(bunch.data, dtype=torch.float32)  # (N, num_features)
        y = torch.as_tensor(bunch.target, dtype=torch.int64)  # (N,)
        self.class_names = [str(name) for name in bunch.target_names]
        self.feature_names = [str(name) for name in bunch.feature_names]
        self._set_data(x, y, self._task, num_classes=len(self.class_names))


class DigitsDataModule(_SklearnDataModule):
    """8x8 handwritten digits: 1797 rows, 64 features (pixel counts 0..16), 10 classes.

    The default split leaves 1257 train, 270 validation and 270 test rows.

    Args:
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "digits"
    _load = staticmethod(datasets.load_digits)


class IrisDataModule(_SklearnDataModule):
    """Fisher's iris: 150 rows, 4 features, 3 classes.

    Args:
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "iris"
    _load = staticmethod(datasets.load_iris)


class WineDataModule(_SklearnDataModule):
    """Wine cultivars: 178 rows, 13 chemical features, 3 classes.

    Args:
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "wine"
    _load = staticmethod(datasets.load_wine)


class BreastCancerDataModule(_SklearnDataModule):
    """Wisconsin breast cancer: 569 rows, 30 features, task "binary" (0 malignant, 1 benign).

    Targets stay int64 class indices with ``num_classes=2``; a model with one logistic output
    casts them to float (``y.float().unsqueeze(-1)``) for a sigmoid cross-entropy.

    Args:
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "breast_cancer"
    _task = "binary"
    _load = staticmethod(datasets.load_breast_cancer)
