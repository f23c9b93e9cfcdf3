"""Datasets: a registry of named loaders that all return uint8 images at the model's input size."""

from transferkit.data.base import SPLITS, ImageDataset, Split, data_root
from transferkit.data.registry import available_datasets, check_dataset_name, load_dataset, register_dataset
from transferkit.data.spec import DatasetSpec

__all__ = [
    "SPLITS",
    "DatasetSpec",
    "ImageDataset",
    "Split",
    "available_datasets",
    "check_dataset_name",
    "data_root",
    "load_dataset",
    "register_dataset",
]
