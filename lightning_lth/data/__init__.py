"""Data: the dataset table (``datasets.py``), the resumable training loaders
(``device_loader.py``) and the DataModule (``datamodule.py``). The names users and the rest
of the package import are re-exported here: ``lightning_lth.data.LTHDataModule`` is the
config path of ``data:``."""

from lightning_lth.data.datamodule import LTHDataModule
from lightning_lth.data.datasets import (
    DATASETS,
    IMAGENET_STATS,
    DatasetInfo,
    check_data_dir,
    dataset_info,
    images_as_tensor,
    load_split,
)
from lightning_lth.data.device_loader import DeviceLoader

__all__ = ["DATASETS", "IMAGENET_STATS", "DatasetInfo", "DeviceLoader", "LTHDataModule",
           "check_data_dir", "dataset_info", "images_as_tensor", "load_split"]
