"""MNIST and Fashion-MNIST read from local IDX files, with a hand-written IDX parser.

IDX layout (big-endian throughout): two zero bytes, one dtype code byte, one byte ``ndim``, then
``ndim`` uint32 sizes, then the ``prod(sizes)`` items row-major. The files may be gzipped.
Nothing is ever downloaded: point ``path`` at a folder that already holds the four files.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from manualbp.data.base import TensorDataModule

# IDX dtype code -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_EXPECTED = ", ".join(IDX_FILES) + " (each raw or .gz)"


# Deflate inflates at most about 1032-fold; a gzip file whose header declares more data than
# that is corrupt, and is refused before anything is inflated.
_MAX_INFLATE = 1032


def read_idx(path: str | Path) -> Tensor:
    """Read one IDX file, raw or gzipped, into a tensor of its stored shape and dtype.

    The header is read first and the declared size checked against the file's size (for
    gzip: against the most its size can inflate to), so a corrupt header never makes it
    read or inflate more than the file can hold.

    Args:
        path: the file; gzip is recognised by its magic bytes, not by the name.

    Raises:
        ValueError: bad gzip stream, bad magic number, or a size that does not match the header.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as handle:
            head = handle.read(4)
            _check_magic(path, head)
            ndim = head[3]
            dims = handle.read(4 * ndim)
            offset = 4 + 4 * ndim
            if len(dims) < 4 * ndim:
                raise ValueError(
                    f"idx: {path} is truncated: expected a {offset}-byte header for {ndim} dims, "
                    f"got {4 + len(dims)} bytes"
                )
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = offset + math.prod(shape) * dtype.itemsize
            if gzipped and expected > _MAX_INFLATE * size + offset:
                raise ValueError(
                    f"idx: {path} declares shape {shape} of {dtype.name} ({expected} bytes), "
                    f"more than a {size}-byte gzip file can inflate to; the file is corrupt"
                )
            if not gzipped and size != expected:
                raise ValueError(
                    f"idx: {path} has {size} bytes, expected {expected} for shape {shape} of "
                    f"{dtype.name}; the file is truncated or corrupt"
                )
            payload = handle.read(expected - offset + 1)  # one more: is there too much?
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"idx: {path} is not a valid gzip file ({err})") from err
    if len(payload) != expected - offset:
        got = offset + len(payload)
        have = f"more than {expected}" if got > expected else f"{got}"
        raise ValueError(
            f"idx: {path} has {have} bytes, expected {expected} for shape {shape} of "
            f"{dtype.name}; the file is truncated or corrupt"
        )
    items = np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))
    return torch.from_numpy(items.reshape(shape))


def _check_magic(path: Path, head: bytes) -> None:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        codes = ",".join(f"{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(
            f"idx: {path} has a bad magic number: expected bytes 00 00 <dtype in {codes}> "
            f"<ndim >= 1>, got {head[:4].hex(' ') or 'an empty file'}; the file is corrupt or "
            "not an IDX file"
        )


class MNISTDataModule(TensorDataModule):
    """MNIST digits from local IDX files: 784 features scaled to [0, 1], then standardised.

    ``path`` is either the folder holding the four IDX files or torchvision's root, whose files
    sit in ``<path>/MNIST/raw/``. The official t10k set is the test split; validation rows are
    drawn (seeded) from the 60k training rows. There is no ``test_fraction``.

    Args:
        path: folder with the IDX files (required; never downloaded). Default: None (an error).
        batch_size, num_workers, seed, standardize: see :class:`TensorDataModule`
            (defaults 64, 0, 0, True).
        val_fraction: share of the training files' rows held out for validation. Default: 0.1.

    Attributes:
        path (str): the folder the files were read from.
        test_indices: rows of the t10k files.
    """

    name = "mnist"
    _raw_subdir = "MNIST"  # torchvision keeps the files in <root>/MNIST/raw
    _class_names = [str(d) for d in range(10)]

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        standardize: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, val_fraction, None, standardize)
        folder = self._locate(path)
        self.path = str(folder)
        x_train, y_train = self._read_split(folder, "train")
        x_test, y_test = self._read_split(folder, "t10k")
        if x_train.shape[1] != x_test.shape[1]:
            raise ValueError(
                f"{self.name}: expected train and t10k images of the same size, got "
                f"{x_train.shape[1]} and {x_test.shape[1]} pixels"
            )
        self.class_names = list(self._class_names)
        self._set_data(x_train, y_train, "multiclass", 10, test=(x_test, y_test))

    def _locate(self, path: str | Path | None) -> Path:
        """The folder holding the IDX files: ``path`` itself or torchvision's ``<path>/X/raw``."""
        if path is None or str(path) == "":
            raise ValueError(
                f"{self.name}: data.path is not set (got {path!r}); expected a folder holding "
                f"{_EXPECTED}; set data.path=<folder>"
            )
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"{self.name}: data.path='{path}' is not a folder; expected a folder holding "
                f"{_EXPECTED}; set data.path=<folder>"
            )
        nested = root / self._raw_subdir / "raw"
        for folder in (root, nested):
            if _find(folder, IDX_FILES[0]) is not None:
                missing = [stem for stem in IDX_FILES if _find(folder, stem) is None]
                if missing:
                    raise FileNotFoundError(
                        f"{self.name}: {folder} lacks {', '.join(m + '[.gz]' for m in missing)}; "
                        f"expected all of {_EXPECTED}"
                    )
                return folder
        raise FileNotFoundError(
            f"{self.name}: data.path='{path}' has no {IDX_FILES[0]}[.gz] (nor has {nested}); "
            f"expected the four IDX files {_EXPECTED}; set data.path=<folder holding them>"
        )

    def _read_split(self, folder: Path, split: str) -> tuple[Tensor, Tensor]:
        """Images as float32 (N, H*W) in [0, 1] and labels as int64 (N,) of one split."""
        images_file = _find(folder, f"{split}-images-idx3-ubyte")
        labels_file = _find(folder, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(
                f"{self.name}: expected {images_file.name} to hold uint8 images (N, H, W), got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        if labels.dtype != torch.uint8 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"{self.name}: expected {labels_file.name} to hold uint8 labels of shape "
                f"({images.shape[0]},) to match the images, got {labels.dtype} of shape "
                f"{tuple(labels.shape)}"
            )
        if labels.numel() and int(labels.max()) >= len(self._class_names):
            raise ValueError(
                f"{self.name}: expected labels 0..{len(self._class_names) - 1} in "
                f"{labels_file.name}, got {int(labels.max())}"
            )
        if images.shape[0] == 0:
            raise ValueError(
                f"{self.name}: {images_file} holds 0 images; expected at least one (the "
                f"{split} split cannot be empty)"
            )
        x = images.reshape(images.shape[0], -1).float() / 255.0  # (N, H, W) -> (N, H*W)
        return x, labels.long()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando's clothing images) from local IDX files; same layout as MNIST.

    torchvision keeps these files in ``<path>/FashionMNIST/raw/``.

    Args:
        path, batch_size, num_workers, seed, val_fraction, standardize: see
            :class:`MNISTDataModule` (defaults None, 64, 0, 0, 0.1, True).
    """

    name = "fashion_mnist"
    _raw_subdir = "FashionMNIST"
    _class_names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None
