"""Data: sources of labelled images, the load-time check, the fixed split, and the transforms that feed a backbone."""

from vlfit.data.prepare import prepare_data, survey_data
from vlfit.data.sources import ImageSet, load_source
from vlfit.data.split import Split, load_split, stratified_split
from vlfit.data.transforms import train_transform

__all__ = ["ImageSet", "load_source", "prepare_data", "survey_data", "Split", "load_split", "stratified_split",
           "train_transform"]
