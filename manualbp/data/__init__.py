"""Offline LightningDataModules: scikit-learn sets, generated 2-D sets, local MNIST and CSV.

Nothing here downloads. Every module loads in ``__init__`` and then exposes ``num_features``,
``num_classes``, ``task``, ``is_2d``, ``class_names``, ``mean``/``std`` and the four loaders;
see :class:`TensorDataModule`. ``DATAMODULES`` maps each short name to its class.
"""

from manualbp.data.base import TensorDataModule
from manualbp.data.csv_file import CSVDataModule
from manualbp.data.idx import FashionMNISTDataModule, MNISTDataModule, read_idx
from manualbp.data.mnist1d import MNIST1DDataModule
from manualbp.data.sklearn_sets import (
    BreastCancerDataModule,
    DigitsDataModule,
    IrisDataModule,
    WineDataModule,
)
from manualbp.data.synthetic import (
    CirclesDataModule,
    MoonsDataModule,
    SpiralsDataModule,
    XORDataModule,
)

DATAMODULES: dict[str, type[TensorDataModule]] = {
    cls.name: cls
    for cls in (
        DigitsDataModule,
        IrisDataModule,
        WineDataModule,
        BreastCancerDataModule,
        XORDataModule,
        MoonsDataModule,
        CirclesDataModule,
        SpiralsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        MNIST1DDataModule,
        CSVDataModule,
    )
}

__all__ = [
    "DATAMODULES",
    "BreastCancerDataModule",
    "CSVDataModule",
    "CirclesDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IrisDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "MoonsDataModule",
    "SpiralsDataModule",
    "TensorDataModule",
    "WineDataModule",
    "XORDataModule",
    "read_idx",
]
