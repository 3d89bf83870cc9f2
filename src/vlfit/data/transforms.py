"""The reference training augmentation (`data.pipeline: torchvision`), derived from the backbone's own
preprocessing, never hard-coded per model. Evaluation has one path for both pipelines: `gpu_transforms.EvalResize`."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from vlfit.config import DataConfig
from vlfit.models.backbones import Preprocess

INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def train_transform(pre: Preprocess, data: DataConfig) -> v2.Compose:
    """RandomResizedCrop + horizontal flip + the backbone's normalisation; uint8 CHW in, float out."""
    return v2.Compose([
        v2.RandomResizedCrop(pre.image_size, scale=data.crop_scale, ratio=data.crop_ratio,
                             interpolation=INTERPOLATION[pre.interpolation], antialias=True),
        v2.RandomHorizontalFlip(data.hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ])
