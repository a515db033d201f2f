"""Data: layouts on disk, DMT splits, joint transforms, datasets, the datamodule, the synthetic set."""

from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.datasets import SegmentationDataset
from dmtc.data.layouts import DatasetLayout
from dmtc.data.splits import dmt_split, split_ratio
from dmtc.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec, generate_synthetic

__all__ = [
    "SYNTHETIC_CLASSES",
    "DatasetLayout",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SyntheticSpec",
    "dmt_split",
    "generate_synthetic",
    "split_ratio",
]
