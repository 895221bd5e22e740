"""A numeric CSV file from a local path: every column a feature except the label column."""

import csv
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from manualbp.data.base import TensorDataModule

_CSV_TASKS = ("multiclass", "binary", "regression")
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _float32(cell: str, where: str) -> float | None:
    """The cell as a float that float32 can hold; None if not a finite number at all."""
    value = _number(cell)
    if value is not None and abs(value) > _FLOAT32_MAX:
        raise ValueError(f"csv: {where}: {cell!r} is beyond float32's range (+-3.4e38), where "
                         "training computes; rescale that column")
    return value


def _integer(cell: str) -> int | None:
    """The exact integer a cell spells ("7", "7.0", "1e3", "9007199254740993"), else None."""
    try:
        value = Decimal(cell)
    except InvalidOperation:
        return None
    if not value.is_finite() or value != value.to_integral_value():
        return None
    return int(value)


def _read_rows(file: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """Non-blank rows as (line number as an editor shows it, stripped cells)."""
    rows = []
    with file.open(newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        for row in reader:
            cells = [cell.strip() for cell in row]
            if any(cells):
                rows.append((reader.line_num, cells))
    return rows


class CSVDataModule(TensorDataModule):
    """Rows of a numeric CSV file; one column holds the label (class or regression target).

    Features must be finite numbers. For classification the labels may be any ints or strings;
    they map to 0..K-1 in sorted order (numerically when all labels are integers) and
    ``class_names`` keeps their text. For ``task="regression"`` the label column must be numeric
    and becomes float32 targets of shape (N, 1), with ``num_classes=1``.

    Args:
        path: the CSV file (required). Default: None (an error).
        label_column: column name (needs a header) or index (negative counts from the end).
            Default: -1, the last column.
        task: "multiclass", "binary" (exactly two classes) or "regression". Default: "multiclass".
        header: whether the first row names the columns; None guesses: it is a header when none
            of its cells is a number. Default: None.
        delimiter: the cell separator. Default: ",".
        batch_size, num_workers, seed, val_fraction, test_fraction, standardize: see
            :class:`TensorDataModule` (defaults 64, 0, 0, 0.15, 0.15, True).

    Attributes:
        path (str): the file read.
        label_name (str): the label column's name ("column <i>" without a header).
        feature_names (list[str]): the other columns' names, in file order.
    """

    name = "csv"

    def __init__(
        self,
        path: str | None = None,
        label_column: str | int = -1,
        task: str = "multiclass",
        header: bool | None = None,
        delimiter: str = ",",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, val_fraction, test_fraction, standardize)
        if header not in (True, False, None):
            raise ValueError(f"csv: expected header to be true, false or null, got {header!r}")
        if task not in _CSV_TASKS:
            raise ValueError(f"csv: expected task in {_CSV_TASKS}, got {task!r}")
        if path is None or str(path) == "":
            raise ValueError(
                f"csv: data.path is not set (got {path!r}); expected a CSV file of numeric "
                "feature columns and one label column; set data.path=<file.csv>"
            )
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"csv: data.path='{path}' is not a file; expected a CSV file of numeric feature "
                "columns and one label column; set data.path=<file.csv>"
            )
        self.path = str(file)
        rows = _read_rows(file, delimiter)
        if not rows:
            raise ValueError(f"csv: expected at least one data row in {file}, got none")
        width = len(rows[0][1])
        if width < 2:
            raise ValueError(
                f"csv: expected at least 2 columns (features and a label) in {file}, got {width}; "
                "check data.delimiter"
            )
        if header is None:
            header = all(_number(cell) is None for cell in rows[0][1])
        names = rows[0][1] if header else [f"column {i}" for i in range(width)]
        body = rows[1:] if header else rows
        if not body:
            raise ValueError(f"csv: expected at least one data row in {file}, got none")
        label = self._label_index(label_column, names, has_header=header)

        features, labels = [], []
        for line, row in body:
            if len(row) != width:
                raise ValueError(
                    f"csv: row {line} of {file} has {len(row)} columns, expected {width}"
                )
            values = []
            for i, cell in enumerate(row):
                if i == label:
                    continue
                where = f"row {line}, column '{names[i]}' of {file}"
                value = _float32(cell, where)
                if value is None:
                    raise ValueError(f"csv: {where}: expected a finite number, got {cell!r}")
                values.append(value)
            features.append(values)
            labels.append((line, row[label]))

        self.label_name = names[label]
        self.feature_names = [n for i, n in enumerate(names) if i != label]
        x = torch.tensor(features, dtype=torch.float32)  # (N, width - 1)
        if task == "regression":
            y = self._regression_targets(labels)
            self._set_data(x, y, task, num_classes=1)
        else:
            y, self.class_names = self._class_targets(labels, task)
            self._set_data(x, y, task, num_classes=len(self.class_names))

    def _label_index(self, label_column: str | int, names: list[str], has_header: bool) -> int:
        if isinstance(label_column, bool) or not isinstance(label_column, (str, int)):
            raise ValueError(
                f"csv: expected label_column to be a column name or index, got {label_column!r}"
            )
        if isinstance(label_column, str):
            if not has_header:
                raise ValueError(
                    f"csv: label_column={label_column!r} is a name but the file has no header "
                    "row; pass the column index instead, or header=True"
                )
            if label_column not in names:
                raise ValueError(
                    f"csv: label_column={label_column!r} not found; columns present: {names}"
                )
            return names.index(label_column)
        if not -len(names) <= label_column < len(names):
            raise ValueError(
                f"csv: expected label_column in {-len(names)}..{len(names) - 1} for "
                f"{len(names)} columns, got {label_column}"
            )
        return label_column % len(names)

    def _regression_targets(self, labels: list[tuple[int, str]]) -> torch.Tensor:
        targets = []
        for line, cell in labels:
            value = _float32(cell, f"row {line}, column '{self.label_name}'")
            if value is None:
                raise ValueError(
                    f"csv: row {line}, column '{self.label_name}': expected a finite number "
                    f"as regression target, got {cell!r}; or set data.task=multiclass"
                )
            targets.append([value])
        return torch.tensor(targets, dtype=torch.float32)  # (N, 1)

    def _class_targets(
        self, labels: list[tuple[int, str]], task: str
    ) -> tuple[torch.Tensor, list[str]]:
        texts = [cell for _, cell in labels]
        numbers = [_number(cell) for cell in texts]
        if all(v is not None for v in numbers):
            integers = [_integer(t) for t in texts]  # exact: labels above 2**53 stay apart
            fractional = next((t for t, v in zip(texts, integers, strict=True) if v is None), None)
            if fractional is not None:
                raise ValueError(
                    f"csv: task={task!r} but label column '{self.label_name}' holds the "
                    f"non-integer {fractional}; set data.task=regression"
                )
            texts = [str(v) for v in integers]  # "1.0" and "1" are the same class
            classes = sorted(set(texts), key=int)
        else:
            classes = sorted(set(texts))
        expected = "exactly 2" if task == "binary" else "at least 2"
        if len(classes) < 2 or (task == "binary" and len(classes) != 2):
            raise ValueError(
                f"csv: task={task!r} needs {expected} classes in label column "
                f"'{self.label_name}', got {len(classes)}: {classes[:10]}"
            )
        index = {name: k for k, name in enumerate(classes)}
        return torch.tensor([index[t] for t in texts], dtype=torch.int64), classes
