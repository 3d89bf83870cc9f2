"""Pixel pipelines derived from the backbone's own preprocessing, never hard-coded per model."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from vlfit.config import DataConfig
from vlfit.models.backbones import Preprocess

_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def train_transform(pre: Preprocess, data: DataConfig) -> v2.Compose:
    """RandomResizedCrop + horizontal flip + the backbone's normalisation; uint8 CHW in, float out."""
    return v2.Compose([
        v2.RandomResizedCrop(pre.image_size, scale=data.crop_scale, ratio=data.crop_ratio,
                             interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
        v2.RandomHorizontalFlip(data.hflip),
        *_to_normalized(pre),
    ])


def eval_transform(pre: Preprocess) -> v2.Compose:
    """Resize + center crop (CLIP) or resize to a square (SigLIP), then normalise: as the model's processor."""
    interpolation = _INTERPOLATION[pre.interpolation]
    if pre.resize == "squash":
        resize = [v2.Resize((pre.image_size, pre.image_size), interpolation=interpolation, antialias=True)]
    else:
        resize = [v2.Resize(pre.image_size, interpolation=interpolation, antialias=True),
                  v2.CenterCrop(pre.image_size)]
    return v2.Compose([*resize, *_to_normalized(pre)])


def _to_normalized(pre: Preprocess) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]
