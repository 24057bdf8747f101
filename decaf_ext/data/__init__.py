"""Datasets and how they are split: text and record datasets (the offline BBC News corpus, local files, hub
ids), image datasets, and the partition of a training set over agents."""

from decaf_ext.data.images import ImageDataset, load_image_dataset
from decaf_ext.data.partition import SCHEMES, label_histograms, partition
from decaf_ext.data.text import OFFLINE_DEFAULT, RecordDataset, TextDataset, load_record_dataset, load_text_dataset

__all__ = ["OFFLINE_DEFAULT", "SCHEMES", "ImageDataset", "RecordDataset", "TextDataset", "label_histograms",
           "load_image_dataset", "load_record_dataset", "load_text_dataset", "partition"]
