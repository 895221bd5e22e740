"""Shared base of the offline data modules: seeded split, train-only standardisation, loaders.

Every concrete module loads its whole data set in ``__init__`` (all of them fit in memory), so
``num_features``, ``num_classes`` and friends exist right after construction and a training
script can size the network from them before the Trainer starts. ``setup()`` has nothing left to
do, and since the split comes from a ``torch.Generator`` seeded with ``seed``, every DDP rank that
builds the module gets the same split.
"""

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

TASKS = ("multiclass", "binary", "regression")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: expected {name} to be an int >= {minimum}, got {value!r}")


class EpochSampler(Sampler[int]):
    """Shuffles the rows anew each epoch from (seed, epoch) alone, so an epoch's order is the
    same whether or not the run was stopped and resumed; `skip` rows are left out once, for
    the first pass over epoch `skip_epoch` (a resume in the middle of that epoch)."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.skip, self.skip_epoch = 0, 0, None

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        skip = self.skip if self.skip_epoch == self.epoch else 0
        self.skip, self.skip_epoch = 0, None
        yield from order[skip:].tolist()


class ResumableLoader(DataLoader):
    """The training loader: its state (the epoch) travels in Lightning checkpoints, and a resume
    in the middle of an epoch goes on with that epoch's remaining rows, in their order."""

    def __init__(self, dataset, datamodule=None, sampler=None, **kwargs) -> None:
        # Lightning builds the loader again with its DistributedSampler under DDP.
        if sampler is None:
            sampler = EpochSampler(len(dataset), torch.initial_seed() % 2**31)
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state: dict) -> None:
        trainer = getattr(self.datamodule, "trainer", None)
        if trainer is None or not isinstance(self.sampler, EpochSampler):
            return  # DDP re-shards the rows with its own sampler: the epoch starts afresh
        # Batches whose update is in the checkpoint ("completed" lags by the one whose
        # on_train_batch_end wrote it).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        self.sampler.skip_epoch, self.sampler.skip = state["epoch"], done * self.batch_size


class TensorDataModule(L.LightningDataModule):
    """A LightningDataModule over in-memory tensors, split once with a fixed seed.

    Subclasses load their rows in ``__init__`` and hand them to :meth:`_set_data`, which shuffles
    them with ``seed``, cuts off ``val_fraction`` and ``test_fraction`` of the rows (or takes a
    given official test set), fits the per-feature mean and std on the training rows only and
    applies them to every split.

    Targets: int64 class indices ``(N,)`` for ``task="multiclass"`` and ``task="binary"``
    (binary keeps indices 0/1 and ``num_classes=2``; a model with a single logistic output turns
    them into float itself), float32 ``(N, 1)`` for ``task="regression"`` (``num_classes=1``).

    Args:
        batch_size: rows per batch in every loader. Default: 64.
        num_workers: DataLoader worker processes. Default: 0.
        seed: seed of the split (and of generated data). Default: 0.
        val_fraction: share of all rows that goes to validation. Default: 0.15.
        test_fraction: share of all rows that goes to test (unused when a subclass brings an
            official test set). Default: 0.15.
        standardize: subtract the training mean and divide by the training std. Default: True.

    Attributes:
        num_features (int): columns of ``x``.
        num_classes (int): classes (1 for regression: the number of targets).
        task (str): "multiclass", "binary" or "regression".
        is_2d (bool): True for the generated 2-D sets, whose decision boundary can be drawn.
        class_names (list[str] | None): name of class k at index k; None for regression.
        feature_names (list[str] | None): column names where the source has them.
        mean, std (Tensor): ``(num_features,)`` float32, fitted on train; zeros and ones when
            ``standardize=False``, so ``x_raw = x * std + mean`` always holds.
        train_indices, val_indices, test_indices (Tensor): int64 rows of the loaded data (for
            an official test set: rows of that set) that make up each split.
    """

    name = "tensors"  # short name used in error messages, e.g. "mnist: ..."
    is_2d = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        _check_int(self.name, "batch_size", batch_size, 1)
        _check_int(self.name, "num_workers", num_workers, 0)
        _check_int(self.name, "seed", seed, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.standardize = standardize
        self.class_names: list[str] | None = None
        self.feature_names: list[str] | None = None
        self.poisson_rate: float | None = None  # set by DP-SGD: Poisson-sampled train batches

    def _check_fractions(self, with_test: bool) -> None:
        val, test = self.val_fraction, self.test_fraction if with_test else 0.0
        ok_val = _is_real(val) and 0 < val < 1
        ok_test = not with_test or (_is_real(test) and 0 < test < 1)
        if not (ok_val and ok_test and val + test < 1):
            got = f"val_fraction={val!r}" + (f", test_fraction={test!r}" if with_test else "")
            rule = "0 < val_fraction < 1" + (
                ", 0 < test_fraction < 1 and val_fraction + test_fraction < 1" if with_test else ""
            )
            raise ValueError(f"{self.name}: expected {rule}, got {got}")

    def _set_data(
        self,
        x: Tensor,
        y: Tensor,
        task: str,
        num_classes: int,
        test: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Split (x, y), fit the standardisation on train, and build the three datasets."""
        if task not in TASKS:
            raise ValueError(f"{self.name}: expected task in {TASKS}, got {task!r}")
        self._check_fractions(with_test=test is None)
        n = x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = round(n * self.val_fraction)
        n_test = 0 if test is not None else round(n * self.test_fraction)
        n_train = n - n_val - n_test
        if min(n_train, n_val) < 1 or (test is None and n_test < 1):
            raise ValueError(
                f"{self.name}: expected at least one row in each split, got {n} rows -> "
                f"train={n_train}, val={n_val}, test={n_test}; use more samples or other fractions"
            )
        self.train_indices = perm[:n_train]
        self.val_indices = perm[n_train : n_train + n_val]
        if test is None:
            self.test_indices = perm[n_train + n_val :]
            x_test, y_test = x[self.test_indices], y[self.test_indices]
        else:
            x_test, y_test = test
            self.test_indices = torch.arange(x_test.shape[0])

        x_train = x[self.train_indices]
        self.mean, self.std = self._fit_standardisation(x_train)
        self.task = task
        self.num_classes = num_classes
        self.num_features = x.shape[1]
        self._train = TensorDataset(self._apply(x_train), y[self.train_indices])
        self._val = TensorDataset(self._apply(x[self.val_indices]), y[self.val_indices])
        self._test = TensorDataset(self._apply(x_test), y_test)

    def _fit_standardisation(self, x_train: Tensor) -> tuple[Tensor, Tensor]:
        d = x_train.shape[1]
        if not self.standardize:
            return torch.zeros(d), torch.ones(d)
        # float64 statistics: a constant float32 column must come out with std exactly
        # "constant", not the rounding noise of a float32 sum.
        x64 = x_train.double()
        mean = x64.mean(dim=0)
        std = x64.std(dim=0, correction=0)
        constant = std <= 1e-10 * mean.abs().clamp_min(1.0)
        std = torch.where(constant, torch.ones_like(std), std)  # leave constant columns at 0
        return mean.float(), std.float()

    def _apply(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std).contiguous()

    def full_train_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole (standardised) training split as ``(x, y)``."""
        return self._train.tensors

    def full_val_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole (standardised) validation split as ``(x, y)``."""
        return self._val.tensors

    def full_test_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole (standardised) test split as ``(x, y)``."""
        return self._test.tensors

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.poisson_rate is not None:  # DP-SGD: each row joins each batch with prob. q
            from manualbp.dp import PoissonBatches

            sampler = PoissonBatches(len(self._train), self.poisson_rate)
            return DataLoader(self._train, batch_sampler=sampler, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        # else shuffled anew each epoch by EpochSampler (seeded by the run's torch seed)
        return ResumableLoader(self._train, self, batch_size=self.batch_size,
                               num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._test, shuffle=False)
