"""Data the loaders must refuse at load time, naming what is wrong (or keep exact)."""

import gzip
import struct

import numpy as np
import pytest
from test_data_csv import table, write_csv
from test_data_idx import fake_mnist, idx_bytes, write

from manualbp.data import CSVDataModule, MNISTDataModule, read_idx

ROWS = [(i, i * 0.5, i % 3) for i in range(20)]


@pytest.mark.parametrize(("row", "cell", "task", "column"), [
    (5, "1e39", "multiclass", "b"), (7, "-3.5e38", "multiclass", "a"),
    (4, "1e39", "regression", "y")])
def test_a_csv_value_beyond_float32_is_refused_naming_row_and_column(tmp_path, row, cell, task,
                                                                     column):
    rows = [list(r) for r in ROWS]
    rows[row - 2]["aby".index(column)] = cell  # line 1 is the header
    path = write_csv(tmp_path, table(rows))
    with pytest.raises(ValueError, match=rf"csv: row {row}, column '{column}'.*: '{cell}' is "
                                         r"beyond float32's range"):
        CSVDataModule(path=path, task=task)


def test_integer_labels_above_2_to_the_53_stay_distinct(tmp_path):
    big = 2**53
    labels = [big, big + 1, big + 2]  # one float64 for the first two
    rows = [(i, i * 0.5, labels[i % 3]) for i in range(30)]
    dm = CSVDataModule(path=write_csv(tmp_path, table(rows)))
    assert dm.num_classes == 3
    assert dm.class_names == [str(v) for v in labels]


@pytest.mark.parametrize("split", ["t10k", "train"])
def test_an_idx_file_with_no_images_is_one_clear_line(tmp_path, split):
    empty = {f"{split}_images_idx3_ubyte": np.zeros((0, 28, 28), np.uint8),
             f"{split}_labels_idx1_ubyte": np.zeros(0, np.uint8)}
    fake_mnist(tmp_path, **empty)
    with pytest.raises(ValueError, match=rf"mnist: .*{split}-images-idx3-ubyte holds 0 images; "
                                         "expected at least one"):
        MNISTDataModule(path=tmp_path)


def test_a_gz_idx_file_declaring_an_impossible_size_is_refused_from_its_header(tmp_path):
    # The header claims 4e9 images' worth of bytes; the whole file is a few dozen bytes.
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4_000_000_000)
    path = write(tmp_path / "a", header + b"\x00" * 10, gz=True)
    with pytest.raises(ValueError, match=rf"idx: .*a.gz declares shape \(4000000000,\) of uint8 "
                                         rf"\(4000000008 bytes\), more than a "
                                         rf"{path.stat().st_size}-byte gzip file can inflate to"):
        read_idx(path)
    # A genuine file that inflates a thousandfold is read.
    zeros = np.zeros(200_000, np.uint8)
    big = write(tmp_path / "zeros", idx_bytes(zeros), gz=True)
    assert len(gzip.decompress(big.read_bytes())) > 500 * big.stat().st_size
    assert read_idx(big).shape == (200_000,)
