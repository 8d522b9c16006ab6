"""Data: built-in data sets, ``.npz`` files, factories and image folders, split into train/validation/test, and deterministic loaders."""

from qdistill.data.bundle import DataBundle
from qdistill.data.checks import check_arrays
from qdistill.data.image_folder import load_image_folder
from qdistill.data.images import LazyImages
from qdistill.data.loaders import EpochSampler, InputsDataset, make_loader, make_loaders, make_unlabeled_loader
from qdistill.data.sources import load_data
from qdistill.data.splits import normalize, split_indices

__all__ = ["DataBundle", "EpochSampler", "InputsDataset", "LazyImages", "check_arrays", "load_data", "load_image_folder", "make_loader",
           "make_loaders", "make_unlabeled_loader", "normalize", "split_indices"]
