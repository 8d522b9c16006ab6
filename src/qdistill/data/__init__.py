"""Data: built-in data sets, ``.npz`` files, factories and image folders, split into train/validation/test, and deterministic loaders."""

from qdistill.data.bundle import DataBundle
from qdistill.data.image_folder import load_image_folder
from qdistill.data.images import LazyImages
from qdistill.data.loaders import EpochSampler, make_loader, make_loaders
from qdistill.data.sources import check_arrays, load_data
from qdistill.data.splits import normalize, split_indices

__all__ = ["DataBundle", "EpochSampler", "LazyImages", "check_arrays", "load_data", "load_image_folder", "make_loader",
           "make_loaders", "normalize", "split_indices"]
