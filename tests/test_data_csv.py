"""CSVDataModule on tiny files written here: headers, label columns, label types, errors."""

from pathlib import Path

import pytest
import torch

from manualbp.data import CSVDataModule

# 20 rows: features a, b; integer labels 10, 3, 7 (numeric order 3 < 7 < 10, text order differs)
LABELS = [10, 3, 7, 3, 10, 7, 3, 3, 10, 7, 7, 3, 10, 10, 3, 7, 3, 7, 10, 3]
ROWS = [(i, 0.5 * i * i, label) for i, label in enumerate(LABELS)]


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def table(rows, header: str | None = "a,b,y", sep: str = ",") -> str:
    lines = [header] if header else []
    lines += [sep.join(str(cell) for cell in row) for row in rows]
    return "\n".join(lines) + "\n"


def _all(dm: CSVDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dm.full_train_tensors(), dm.full_val_tensors(), dm.full_test_tensors()]
    order = torch.cat([dm.train_indices, dm.val_indices, dm.test_indices]).argsort()
    return torch.cat([p[0] for p in pairs])[order], torch.cat([p[1] for p in pairs])[order]


@pytest.mark.parametrize("header", [True, None])
def test_header_and_integer_labels(tmp_path, header):
    dm = CSVDataModule(path=write_csv(tmp_path, table(ROWS)), header=header, standardize=False)
    assert (dm.num_features, dm.num_classes, dm.task, dm.is_2d) == (2, 3, "multiclass", False)
    assert dm.class_names == ["3", "7", "10"]
    assert dm.feature_names == ["a", "b"] and dm.label_name == "y"
    x, y = _all(dm)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.tensor([[i, 0.5 * i * i] for i, _, _ in ROWS]))
    assert torch.equal(y, torch.tensor([{3: 0, 7: 1, 10: 2}[label] for label in LABELS]))
    assert [len(dm.train_indices), len(dm.val_indices), len(dm.test_indices)] == [14, 3, 3]


def test_no_header_string_labels_in_first_column(tmp_path):
    rows = [("cat" if i % 3 else "dog", i, -i, 2 * i) for i in range(30)]
    dm = CSVDataModule(
        path=write_csv(tmp_path, table(rows, header=None)), label_column=0, standardize=False
    )
    assert dm.num_features == 3 and dm.class_names == ["cat", "dog"]
    assert dm.feature_names == ["column 1", "column 2", "column 3"]
    x, y = _all(dm)
    assert torch.equal(x[:, 0], torch.arange(30.0))
    assert torch.equal(y, torch.tensor([0 if i % 3 else 1 for i in range(30)]))


def test_label_by_name_in_the_middle_and_other_delimiter(tmp_path):
    text = table([(i, f"L{i % 2}", i + 1) for i in range(20)], header="p ; label ; q", sep=" ; ")
    dm = CSVDataModule(path=write_csv(tmp_path, text), label_column="label", delimiter=";")
    assert dm.feature_names == ["p", "q"] and dm.class_names == ["L0", "L1"]


def test_regression_targets(tmp_path):
    rows = [(i, i % 4, 1.5 * i - 2) for i in range(20)]
    dm = CSVDataModule(path=write_csv(tmp_path, table(rows)), task="regression")
    assert (dm.num_classes, dm.task, dm.class_names) == (1, "regression", None)
    _, y = _all(dm)
    assert y.dtype == torch.float32 and y.shape == (20, 1)
    assert torch.equal(y[:, 0], torch.tensor([1.5 * i - 2 for i in range(20)]))
    torch.testing.assert_close(
        dm.full_train_tensors()[0].mean(0), torch.zeros(2), atol=1e-5, rtol=0
    )


def test_binary_and_equal_numeric_labels(tmp_path):
    rows = [(i, -i, ["0", "1.0", "1", "0.0"][i % 4]) for i in range(20)]
    dm = CSVDataModule(path=write_csv(tmp_path, table(rows)), task="binary")
    assert (dm.num_classes, dm.task, dm.class_names) == (2, "binary", ["0", "1"])
    assert _all(dm)[1].tolist() == [[0, 1, 1, 0][i % 4] for i in range(20)]


def test_forced_header_with_numeric_names_and_blank_lines(tmp_path):
    text = "1,2,3\n\n" + table(ROWS, header=None) + "\n\n"
    dm = CSVDataModule(path=write_csv(tmp_path, text), header=True, label_column="3")
    assert dm.feature_names == ["1", "2"] and dm.num_classes == 3
    assert len(dm.train_indices) + len(dm.val_indices) + len(dm.test_indices) == 20


def test_seeded_split(tmp_path):
    path = write_csv(tmp_path, table(ROWS))
    a, b, c = CSVDataModule(path=path), CSVDataModule(path=path), CSVDataModule(path=path, seed=1)
    assert torch.equal(a.val_indices, b.val_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    assert len(next(iter(CSVDataModule(path=path, batch_size=5).train_dataloader()))[0]) == 5


@pytest.mark.parametrize("path", [None, ""])
def test_path_not_set(path):
    with pytest.raises(
        ValueError,
        match=r"csv: data.path is not set \(got (None|'')\); expected "
        r"a CSV file of numeric feature columns and one label column; set "
        r"data.path=<file.csv>",
    ):
        CSVDataModule(path=path)


def test_path_missing(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"csv: data.path='.*nope.csv' is not a file; "
        r"expected a CSV file",
    ):
        CSVDataModule(path=str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        (
            "a,b,y\n1,2,0\n3,x,1\n",
            {},
            r"csv: row 3, column 'b' of .*data.csv: expected a finite "
            r"number, got 'x'",
        ),
        ("1,2,0\n\n\n3,4,1\n5,,1\n", {}, r"csv: row 5, column 'column 1' .*got ''"),
        ("a,b,y\n1,inf,0\n", {}, r"row 2, column 'b' .*got 'inf'"),
        (
            "a,b,y\n1,2,0\n",
            {"label_column": "label"},
            r"csv: label_column='label' not found; columns present: \['a', 'b', 'y'\]",
        ),
        (
            "1,2,0\n",
            {"label_column": "y"},
            r"csv: label_column='y' is a name but the file has no header row; pass the column "
            r"index instead, or header=True",
        ),
        (
            "1,2,0\n",
            {"label_column": 3},
            r"csv: expected label_column in -3..2 for 3 columns, "
            r"got 3",
        ),
        (
            "1,2,0\n",
            {"label_column": 1.0},
            r"csv: expected label_column to be a column name or "
            r"index, got 1.0",
        ),
        ("a,b,y\n1,2,0\n1,2\n", {}, r"csv: row 3 of .* has 2 columns, expected 3"),
        (
            "a,b,y\n1,2,0\n1,2,cat\n",
            {"task": "regression"},
            r"csv: row 3, column 'y': expected a finite number as regression target, got 'cat'; "
            r"or set data.task=multiclass",
        ),
        (
            "a,b,y\n1,2,0.5\n1,2,1\n",
            {},
            r"csv: task='multiclass' but label column 'y' holds the "
            r"non-integer 0.5; set data.task=regression",
        ),
        (
            "a,b,y\n1,2,0\n1,2,0\n",
            {},
            r"csv: task='multiclass' needs at least 2 classes in label "
            r"column 'y', got 1: \['0'\]",
        ),
        (
            "1,2,a\n1,2,b\n1,2,c\n",
            {"task": "binary"},
            r"csv: task='binary' needs exactly 2 classes in label column 'column 2', got 3",
        ),
        (
            "1,2,0\n",
            {"task": "ordinal"},
            r"csv: expected task in \('multiclass', 'binary', "
            r"'regression'\), got 'ordinal'",
        ),
        (
            "1,2,0\n",
            {"header": "auto"},
            r"csv: expected header to be true, false or null, got "
            r"'auto'",
        ),
        ("", {}, r"csv: expected at least one data row in .*data.csv, got none"),
        ("a,b,y\n", {}, r"csv: expected at least one data row"),
        (
            "1;2;0\n",
            {},
            r"csv: expected at least 2 columns \(features and a label\) in .*, got 1; "
            r"check data.delimiter",
        ),
        ("a,b,y\n1,2,0\n3,4,1\n", {}, r"csv: expected at least one row in each split, got 2 rows"),
    ],
)
def test_bad_files(tmp_path, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CSVDataModule(path=write_csv(tmp_path, text), **kwargs)
