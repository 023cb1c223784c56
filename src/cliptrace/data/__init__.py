"""Datasets: the canonical record, readers for common formats, image loading, the torch pairs dataset."""

from cliptrace.data.check import CheckReport, check_dataset
from cliptrace.data.images import ImageLoader
from cliptrace.data.pairs import PairDataset, make_collate
from cliptrace.data.policy import ON_BAD_SAMPLE, BadSamplePolicy, check_policy
from cliptrace.data.preview import contact_sheet
from cliptrace.data.readers import (
    FORMATS,
    SUPPORTED,
    dataset_path,
    list_shards,
    load_records,
    read_coco,
    read_csv,
    read_hf,
    read_image_folder,
    read_jsonl,
    read_karpathy,
    read_parquet,
    read_webdataset,
    select_split,
)
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.transforms import ImageTransform

__all__ = [
    "FORMATS",
    "ON_BAD_SAMPLE",
    "SUPPORTED",
    "BadSamplePolicy",
    "CheckReport",
    "DatasetError",
    "ImageLoader",
    "ImageTransform",
    "PairDataset",
    "Record",
    "check_dataset",
    "check_policy",
    "contact_sheet",
    "dataset_path",
    "list_shards",
    "load_records",
    "make_collate",
    "read_coco",
    "read_csv",
    "read_hf",
    "read_image_folder",
    "read_jsonl",
    "read_karpathy",
    "read_parquet",
    "read_webdataset",
    "select_split",
]
