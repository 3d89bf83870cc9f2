"""Data: sources of labelled images, the fixed split, and the transforms that feed a backbone."""

from vlfit.data.sources import ImageSet, load_source
from vlfit.data.split import Split, load_split, stratified_split
from vlfit.data.transforms import eval_transform, train_transform

__all__ = ["ImageSet", "load_source", "Split", "load_split", "stratified_split", "eval_transform", "train_transform"]
