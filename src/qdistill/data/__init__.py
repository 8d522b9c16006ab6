"""Data: built-in data sets, ``.npz`` files and factories, split into train/validation/test, and deterministic loaders."""

from qdistill.data.bundle import DataBundle
from qdistill.data.loaders import EpochSampler, make_loader, make_loaders
from qdistill.data.sources import check_arrays, load_data
from qdistill.data.splits import normalize, split_indices

__all__ = ["DataBundle", "EpochSampler", "check_arrays", "load_data", "make_loader", "make_loaders", "normalize",
           "split_indices"]
