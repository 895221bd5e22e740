"""MNIST-1D (Greydanus, 2020), generated offline from the `mnist1d` package's built-in templates.

Ten 1-D digit templates of 12 points are padded, sheared, translated, smoothed-noised and
resampled to 40 points; 5000 examples, 4000 train / 1000 test, as published. The package's
default loader downloads a pickle: we never call it, only its generator (make_dataset with the
published arguments, seed 42), and check the result against a stored checksum so that a change
in the package or in numpy/scipy cannot slip in a different data set unnoticed.

The data separate learning rules that scikit-learn's digits does not: a linear model reaches
about 32%, an MLP trained by backprop about 68%.
"""

import hashlib

import numpy as np
import torch

from manualbp.data.base import TensorDataModule

# sha256 of x, y, x_test, y_test (x rounded to 4 decimals, as float32; y as int64): values, not
# bit patterns, so a last-digit difference between numpy builds does not refuse the data.
CHECKSUM = "52ff3c2747ca40b48758a7efe90688c840d34e77a104b571b49d222c061a6278"
_CACHE: dict[str, dict] = {}  # one generation per process (a sweep builds the module often)


def checksum(data: dict) -> str:
    h = hashlib.sha256()
    for key in ("x", "y", "x_test", "y_test"):
        v = data[key]
        v = np.round(v, 4).astype(np.float32) if key.startswith("x") else v.astype(np.int64)
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def generate_mnist1d() -> dict:
    """The published MNIST-1D as numpy arrays x (4000, 40), y, x_test (1000, 40), y_test."""
    if "data" in _CACHE:
        return _CACHE["data"]
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError(
            "mnist1d: expected the `mnist1d` package (it generates the data offline); "
            "install it with pip install 'manualbp[train]' or pip install mnist1d"
        ) from error
    state = np.random.get_state()  # make_dataset seeds numpy's global generator: put it back
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    got = checksum(data)
    if got != CHECKSUM:
        import mnist1d

        version = getattr(mnist1d, "__version__", "unknown")
        raise RuntimeError(
            f"mnist1d: expected the published data set (sha256 {CHECKSUM[:12]}...), but the "
            f"generator gave {got[:12]}... (mnist1d {version}, numpy {np.__version__}); "
            "install the versions in pyproject.toml's train extra"
        )
    _CACHE["data"] = data
    return data


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D: 40 features, 10 classes, the published 4000 train / 1000 test split.

    Args:
        batch_size, num_workers, seed, standardize: see :class:`TensorDataModule` (defaults 64,
            0, 0, False: the generator already centres the set and scales it to std 1).
        val_fraction: share of the 4000 training rows held out for validation (default 0.1).
            0 trains on all 4000, as the published protocol does, and validates on the test
            split: fine for watching a run, never for choosing one (test the last weights, as
            experiment=rules_mnist1d does).
    """

    name = "mnist1d"

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, standardize: bool = False) -> None:
        super().__init__(batch_size, num_workers, seed, val_fraction, 0.0, standardize)
        data = generate_mnist1d()
        x = torch.as_tensor(data["x"], dtype=torch.float32)  # (4000, 40)
        y = torch.as_tensor(data["y"], dtype=torch.int64)
        test = (torch.as_tensor(data["x_test"], dtype=torch.float32),
                torch.as_tensor(data["y_test"], dtype=torch.int64))
        self.class_names = [str(k) for k in range(10)]
        if val_fraction == 0:
            self._set_data_no_val(x, y, test)
        else:
            self._set_data(x, y, "multiclass", num_classes=10, test=test)

    def _set_data_no_val(self, x, y, test) -> None:
        """All training rows train; the test split doubles as the validation split."""
        from torch.utils.data import TensorDataset

        self.train_indices = torch.arange(x.shape[0])
        self.val_indices = torch.arange(0)
        self.test_indices = torch.arange(test[0].shape[0])
        self.mean, self.std = self._fit_standardisation(x)
        self.task, self.num_classes, self.num_features = "multiclass", 10, x.shape[1]
        self._train = TensorDataset(self._apply(x), y)
        self._test = TensorDataset(self._apply(test[0]), test[1])
        self._val = self._test
