"""The IDX reader and the MNIST / Fashion-MNIST modules reading local folders.

Every file is a tiny one written here; nothing is downloaded and no real MNIST is needed.
"""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from manualbp.data import FashionMNISTDataModule, MNISTDataModule, read_idx

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX by hand: 00 00 <code> <ndim>, big-endian uint32 dims, big-endian
    items."""
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim])
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# ---- IDX reader ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(24).reshape(2, 3, 4) * 7 - 50).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    out = read_idx(write(tmp_path / "a", idx_bytes(array), gz))
    assert out.shape == (2, 3, 4)
    assert out.dtype == torch.from_numpy(array).dtype
    assert torch.equal(out, torch.from_numpy(array))


def test_read_idx_is_big_endian(tmp_path):
    data = bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + bytes([1, 2, 0xFF, 0xFE])
    out = read_idx(write(tmp_path / "a", data))
    assert out.tolist() == [258, -2]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            b"",
            r"bad magic number: expected bytes 00 00 <dtype in 08,09,0b,0c,0d,0e> <ndim >= 1>, "
            r"got an empty file; the file is corrupt or not an IDX file",
        ),
        (bytes([1, 0, 8, 1, 0, 0, 0, 0]), r"bad magic number: .* got 01 00 08 01"),
        (bytes([0, 0, 7, 1, 0, 0, 0, 0]), r"bad magic number: .* got 00 00 07 01"),
        (bytes([0, 0, 8, 0]), r"bad magic number: .* got 00 00 08 00"),
        (
            bytes([0, 0, 8, 3, 0, 0, 0, 2]),
            r"is truncated: expected a 16-byte header for 3 dims, "
            r"got 8 bytes",
        ),
        (
            bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]),
            r"has 10 bytes, expected 11 for shape \(3,\) of "
            r"uint8; the file is truncated or corrupt",
        ),
        (
            bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 1, 2, 3, 4, 5]),
            r"has 13 bytes, expected 12 for "
            r"shape \(1,\) of int32",
        ),
        (b"\x1f\x8b\x08garbage", r"idx: .*a is not a valid gzip file"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        read_idx(write(tmp_path / "a", data))


# ---- MNIST folders ------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 12


def fake_mnist(folder: Path, gz: bool = False, seed: int = 0, **override: np.ndarray) -> dict:
    """Write the four IDX files of a tiny 28x28 MNIST into folder; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(N_TEST, dtype=np.uint8) % 10,
    }
    arrays["train-images-idx3-ubyte"][:, 0, 0] = 0  # a blank pixel, as in real MNIST corners
    arrays.update({name.replace("_", "-"): array for name, array in override.items()})
    for name, array in arrays.items():
        write(folder / name, idx_bytes(array), gz)
    return arrays


@pytest.mark.parametrize(
    ("cls", "layout", "gz"),
    [
        (MNISTDataModule, "", False),
        (MNISTDataModule, "", True),
        (MNISTDataModule, "MNIST/raw", False),
        (FashionMNISTDataModule, "FashionMNIST/raw", True),
        (FashionMNISTDataModule, "", False),
    ],
)
def test_mnist_reads_flat_and_torchvision_layouts(tmp_path, cls, layout, gz):
    arrays = fake_mnist(tmp_path / layout, gz)
    dm = cls(path=str(tmp_path), standardize=False, val_fraction=0.25)
    assert (dm.num_features, dm.num_classes, dm.task, dm.is_2d) == (784, 10, "multiclass", False)
    assert dm.path == str(tmp_path / layout)
    assert len(dm.class_names) == 10
    x_test, y_test = dm.full_test_tensors()  # the official t10k set, in file order
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).reshape(N_TEST, 784) / 255.0
    assert x_test.dtype == torch.float32 and torch.equal(x_test, expected)
    assert y_test.dtype == torch.int64
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    x_train, y_train = dm.full_train_tensors()
    x_val, _ = dm.full_val_tensors()
    assert (len(x_train), len(x_val)) == (N_TRAIN - 10, 10)
    parts = torch.cat([dm.train_indices, dm.val_indices]).sort().values
    assert torch.equal(parts, torch.arange(N_TRAIN))
    images = torch.from_numpy(arrays["train-images-idx3-ubyte"]).reshape(N_TRAIN, 784) / 255.0
    assert torch.equal(x_train, images[dm.train_indices])
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0


def test_mnist_standardises_on_train_and_guards_blank_pixels(tmp_path):
    fake_mnist(tmp_path)
    dm, raw = (
        MNISTDataModule(path=tmp_path, seed=2),
        MNISTDataModule(path=tmp_path, seed=2, standardize=False),
    )
    x_train = dm.full_train_tensors()[0]
    torch.testing.assert_close(x_train.mean(0), torch.zeros(784), atol=1e-5, rtol=0)
    assert dm.std[0] == 1.0 and (x_train[:, 0] == 0).all()
    x_test, raw_test = dm.full_test_tensors()[0], raw.full_test_tensors()[0]
    torch.testing.assert_close(x_test, (raw_test - dm.mean) / dm.std)
    assert torch.equal(dm.val_indices, raw.val_indices)
    assert not torch.equal(dm.val_indices, MNISTDataModule(path=tmp_path, seed=3).val_indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (36, 784)  # 40 rows - 4 for validation, in one batch of 64


@pytest.mark.parametrize("path", [None, ""])
def test_mnist_path_not_set(path):
    with pytest.raises(
        ValueError,
        match=r"mnist: data.path is not set \(got (None|'')\); "
        r"expected a folder holding train-images-idx3-ubyte, .*t10k-labels-idx1-"
        r"ubyte \(each raw or .gz\); set data.path=<folder>",
    ):
        MNISTDataModule(path=path)


def test_mnist_path_missing_or_empty(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"mnist: data.path='.*nowhere' is not a folder; "
        r"expected a folder holding train-images-idx3-ubyte",
    ):
        MNISTDataModule(path=str(tmp_path / "nowhere"))
    with pytest.raises(
        FileNotFoundError,
        match=r"mnist: data.path='.*' has no train-images-idx3"
        r"-ubyte\[.gz\] \(nor has .*MNIST/raw\); expected the four IDX files "
        r"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-"
        r"ubyte, t10k-labels-idx1-ubyte \(each raw or .gz\); set data.path="
        r"<folder holding them>",
    ):
        MNISTDataModule(path=str(tmp_path))
    fake_mnist(tmp_path / "MNIST" / "raw")  # mnist files do not make a fashion folder
    with pytest.raises(FileNotFoundError, match=r"fashion_mnist: .* \(nor has .*FashionMNIST/raw"):
        FashionMNISTDataModule(path=str(tmp_path))


def test_mnist_one_file_missing(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"mnist: .* lacks t10k-labels-idx1-ubyte\[.gz\]; "
        r"expected all of train-images-idx3-ubyte",
    ):
        MNISTDataModule(path=tmp_path)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        (
            {"train_labels_idx1_ubyte": np.zeros(N_TRAIN - 1, np.uint8)},
            ValueError,
            r"mnist: expected train-labels-idx1-ubyte to hold uint8 labels of shape \(40,\) to "
            r"match the images, got torch.uint8 of shape \(39,\)",
        ),
        (
            {"t10k_images_idx3_ubyte": np.zeros((N_TEST, 28, 28), np.int32)},
            ValueError,
            r"mnist: expected t10k-images-idx3-ubyte to hold uint8 images \(N, H, W\), got "
            r"torch.int32 of shape \(12, 28, 28\)",
        ),
        (
            {"t10k_labels_idx1_ubyte": np.full(N_TEST, 10, np.uint8)},
            ValueError,
            r"mnist: expected labels 0..9 in t10k-labels-idx1-ubyte, got 10",
        ),
        (
            {"t10k_images_idx3_ubyte": np.zeros((N_TEST, 14, 14), np.uint8)},
            ValueError,
            r"mnist: expected train and t10k images of the same size, got 784 and 196 pixels",
        ),
    ],
)
def test_mnist_bad_contents(tmp_path, override, error, match):
    fake_mnist(tmp_path, **override)
    with pytest.raises(error, match=match):
        MNISTDataModule(path=tmp_path)


def test_mnist_corrupt_file_names_it(tmp_path):
    fake_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(
        ValueError,
        match=r"idx: .*train-images-idx3-ubyte.gz has 31371 bytes, "
        r"expected 31376",
    ):
        MNISTDataModule(path=tmp_path)


def test_mnist_has_no_test_fraction(tmp_path):
    fake_mnist(tmp_path)
    with pytest.raises(TypeError, match="test_fraction"):
        MNISTDataModule(path=tmp_path, test_fraction=0.1)
    with pytest.raises(
        ValueError,
        match=r"mnist: expected 0 < val_fraction < 1, got "
        r"val_fraction=1.0$",
    ):
        MNISTDataModule(path=tmp_path, val_fraction=1.0)
