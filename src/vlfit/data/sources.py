"""Sources of labelled images. Every source yields the same thing: an `ImageSet`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vlfit.config import DataConfig


@dataclass
class ImageSet:
    """Images with integer labels, ordered class names, and a stable identity per image.

    `images[i]` is an RGB uint8 array (H, W, 3); `ids[i]` names the image across runs, so a split
    written as ids means the same images wherever it is read.
    """

    images: Sequence[np.ndarray]
    labels: np.ndarray
    classes: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet([self.images[i] for i in index], self.labels[index], self.classes,
                        [self.ids[i] for i in index])


class TransformedImages(Dataset):
    """An ImageSet as a torch Dataset: (transform(image), label)."""

    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # HWC uint8 -> CHW uint8 tensor, which torchvision v2 transforms treat as an image.
        pixels = torch.from_numpy(np.ascontiguousarray(self.images.images[i])).permute(2, 0, 1)
        return self.transform(pixels), int(self.images.labels[i])


def load_source(cfg: DataConfig) -> ImageSet:
    """The labelled images `cfg.source` names."""
    if cfg.source == "synthetic-har":
        from vlfit.data.synthetic import HAR_CLASSES, make_synthetic_har

        images, labels = make_synthetic_har(cfg.num_images, cfg.image_size, cfg.seed)
        ids = [f"synthetic-har/{cfg.seed}/{cfg.image_size}/{i:06d}" for i in range(len(labels))]
        return ImageSet(images, labels.astype(np.int64), list(HAR_CLASSES), ids)
    raise ValueError(f"unknown data source {cfg.source!r}")  # unreachable: the config validates it
