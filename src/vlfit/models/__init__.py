"""Backbones, heads, masking and the classifier that joins them."""

from vlfit.models.backbones import FAMILIES, PRESETS, Backbone, Preprocess, build_backbone, load_backbone
from vlfit.models.classifier import ImageClassifier, classifier_from_architecture, count_parameters

__all__ = [
    "FAMILIES", "PRESETS", "Backbone", "Preprocess", "build_backbone", "load_backbone",
    "ImageClassifier", "classifier_from_architecture", "count_parameters",
]
