"""Generated 2-D classification sets (xor, moons, circles, spirals) drawn from a seeded generator.

All four have two features ``x1, x2`` (``is_2d=True``, so the harness can draw the decision
boundary), balanced classes (row i belongs to class ``i % num_classes``), and Gaussian noise of
std ``noise`` added to both coordinates. With two classes the task is "binary" (int64 labels 0/1,
``num_classes=2``), with more it is "multiclass". The data come from ``torch.Generator``
seeded with ``seed``, so the same seed gives the same points on every run and every DDP rank.
"""

import math

import torch
from torch import Tensor

from manualbp.data.base import TensorDataModule, _check_int, _is_real


class _SyntheticDataModule(TensorDataModule):
    """Checks the shared arguments; subclasses build ``(x, y)`` and call :meth:`_finish`."""

    is_2d = True
    _only_two_classes = True

    def __init__(
        self,
        n_samples: int,
        noise: float,
        num_classes: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        val_fraction: float,
        test_fraction: float,
        standardize: bool,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, val_fraction, test_fraction, standardize)
        _check_int(self.name, "num_classes", num_classes, 2)
        if self._only_two_classes and num_classes != 2:
            raise ValueError(
                f"{self.name}: expected num_classes=2 (the set has two classes by construction), "
                f"got {num_classes}; use spirals for more classes"
            )
        _check_int(self.name, "n_samples", n_samples, 1)
        if n_samples < num_classes:
            raise ValueError(
                f"{self.name}: expected n_samples >= num_classes={num_classes}, got {n_samples}"
            )
        if not _is_real(noise) or not 0 <= noise < math.inf:
            raise ValueError(
                f"{self.name}: expected noise to be a finite float >= 0, got {noise!r}"
            )
        self.n_samples = n_samples
        self.noise = float(noise)
        self.class_names = [str(k) for k in range(num_classes)]
        self.feature_names = ["x1", "x2"]
        self._generator = torch.Generator().manual_seed(seed)

    def _finish(self, x: Tensor, y: Tensor, num_classes: int) -> None:
        x = x + self.noise * torch.randn(x.shape, generator=self._generator)  # (n_samples, 2)
        del self._generator  # all drawn; a torch.Generator cannot be pickled to DDP workers
        task = "binary" if num_classes == 2 else "multiclass"
        self._set_data(x.float(), y, task, num_classes)

    def _uniform(self, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(self.n_samples, generator=self._generator)


class XORDataModule(_SyntheticDataModule):
    """XOR: four Gaussian blobs at the corners (+-1, +-1) of a square, label = x1 xor x2.

    A blob's label is 1 when exactly one of its coordinates is positive, so no straight line
    separates the classes: the lecture's reason for a hidden layer.

    Args:
        n_samples: points in all, spread evenly over the four corners. Default: 1000.
        noise: std of each blob around its corner. Default: 0.25.
        num_classes: must be 2. Default: 2.
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "xor"

    def __init__(
        self,
        n_samples: int = 1000,
        noise: float = 0.25,
        num_classes: int = 2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(n_samples, noise, num_classes, batch_size, num_workers,
                         seed, val_fraction, test_fraction, standardize)
        corner = torch.arange(n_samples) % 4
        bits = torch.stack([corner // 2, corner % 2], dim=1)  # (n_samples, 2) in {0, 1}
        x = 2.0 * bits.float() - 1.0  # corners (+-1, +-1)
        self._finish(x, bits[:, 0] ^ bits[:, 1], num_classes)


class MoonsDataModule(_SyntheticDataModule):
    """Two interleaving half circles: (cos t, sin t) and (1 - cos t, 0.5 - sin t), t in [0, pi].

    Args:
        n_samples: points in all, half per moon. Default: 1000.
        noise: std of the Gaussian noise on both coordinates. Default: 0.1.
        num_classes: must be 2. Default: 2.
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "moons"

    def __init__(
        self,
        n_samples: int = 1000,
        noise: float = 0.1,
        num_classes: int = 2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(n_samples, noise, num_classes, batch_size, num_workers,
                         seed, val_fraction, test_fraction, standardize)
        y = torch.arange(n_samples) % 2
        t = self._uniform(0.0, math.pi)
        upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
        lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
        x = torch.where((y == 0).unsqueeze(1), upper, lower)  # (n_samples, 2)
        self._finish(x, y, num_classes)


class CirclesDataModule(_SyntheticDataModule):
    """Two concentric circles: class 0 on radius 1, class 1 on radius ``factor``.

    Args:
        n_samples: points in all, half per circle. Default: 1000.
        noise: std of the Gaussian noise on both coordinates. Default: 0.05.
        factor: radius of the inner circle, in (0, 1). Default: 0.5.
        num_classes: must be 2. Default: 2.
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "circles"

    def __init__(
        self,
        n_samples: int = 1000,
        noise: float = 0.05,
        factor: float = 0.5,
        num_classes: int = 2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(n_samples, noise, num_classes, batch_size, num_workers,
                         seed, val_fraction, test_fraction, standardize)
        if not _is_real(factor) or not 0 < factor < 1:
            raise ValueError(f"circles: expected 0 < factor < 1, got {factor!r}")
        self.factor = float(factor)
        y = torch.arange(n_samples) % 2
        angle = self._uniform(0.0, 2.0 * math.pi)
        radius = torch.where(y == 0, 1.0, self.factor)
        x = radius.unsqueeze(1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        self._finish(x, y, num_classes)


class SpiralsDataModule(_SyntheticDataModule):
    """K spiral arms from the origin; arm k starts at angle 2 pi k / K and winds ``turns`` times.

    A point at radius r in [0, 1) of arm k sits at angle ``2 pi (k / K + turns * r)``.

    Args:
        n_samples: points in all, spread evenly over the arms. Default: 1000.
        noise: std of the Gaussian noise on both coordinates. Default: 0.05.
        num_classes: number of arms K >= 2. Default: 3.
        turns: full turns of each arm from centre to rim, > 0. Default: 1.0.
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).
    """

    name = "spirals"
    _only_two_classes = False

    def __init__(
        self,
        n_samples: int = 1000,
        noise: float = 0.05,
        num_classes: int = 3,
        turns: float = 1.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(n_samples, noise, num_classes, batch_size, num_workers,
                         seed, val_fraction, test_fraction, standardize)
        if not _is_real(turns) or not 0 < turns < math.inf:
            raise ValueError(f"spirals: expected a finite turns > 0, got {turns!r}")
        self.turns = float(turns)
        y = torch.arange(n_samples) % num_classes
        r = self._uniform(0.0, 1.0)
        angle = 2.0 * math.pi * (y.float() / num_classes + self.turns * r)
        x = r.unsqueeze(1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        self._finish(x, y, num_classes)
