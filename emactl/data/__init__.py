"""Datasets (one class per on-disk format), the synthetic ``shapes`` set and joint transforms.

Importing the package registers every dataset in :data:`DATASETS`; build one with
:func:`build_dataset`.
"""
from . import ade20k, cityscapes, cocostuff, context, folder, shapes, voc  # noqa: F401  (registers)
from .base import DATASETS, Sample, SegDataset, build_dataset
from .palette import colorize, save_palette_png, voc_palette
from .paths import resolve_root
from .readers import DataFileError, read_image, read_label
from .transforms import build_transforms

__all__ = [
    "DATASETS",
    "DataFileError",
    "Sample",
    "SegDataset",
    "build_dataset",
    "build_transforms",
    "colorize",
    "read_image",
    "read_label",
    "resolve_root",
    "save_palette_png",
    "voc_palette",
]
