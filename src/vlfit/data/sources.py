"""Sources of labelled images. Every source yields the same thing: an `ImageSet`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlfit.config import DataConfig
from vlfit.data.images import BadImage, Limits, decode
from vlfit.errors import UserError


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
    names: list[str] | None = None  # where each image came from, for people (a file path), when known

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        images = self.images.take(index) if isinstance(self.images, LazyImages) else [self.images[i] for i in index]
        names = None if self.names is None else [self.names[i] for i in index]
        return ImageSet(images, self.labels[index], self.classes, [self.ids[i] for i in index], names)


class LazyImages(Sequence):
    """Images decoded on access, so a dataset needs memory for its files, not for its pixels.

    `images[i]` reads entry i from its store and decodes it with the same `decode` the load-time
    check used, so it never meets an image the check did not pass.
    """

    def __init__(self, blobs: Any, keys: list[Any], names: list[str], limits: Limits):
        self.blobs, self.keys, self.names, self.limits = blobs, keys, names, limits

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return decode(self.blobs.read(self.keys[i]), self.limits)
        except (BadImage, OSError) as err:
            raise UserError(f"{self.names[i]}: {err} (the image changed after the data check)") from None

    def take(self, index: np.ndarray) -> LazyImages:
        return LazyImages(self.blobs, [self.keys[i] for i in index], [self.names[i] for i in index], self.limits)


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
    """Every labelled image `cfg.data` names, sorted by id, decoded lazily and not checked.

    For training use `prepare_data`, which checks every image first; this is for re-reading the
    images a run's split.json names (all of which passed that check): take their `subset` before a
    loader reads the set, as unusable files are among the rest.
    """
    from vlfit.data.catalog import read_catalog

    catalog = read_catalog(cfg)
    labels = catalog.label_index()
    catalog.identify()
    keep = [i for i, e in enumerate(catalog.entries) if e.problem is None and labels[i] >= 0]
    return image_set(catalog, sorted(keep, key=lambda i: catalog.entries[i].id), labels, cfg)


def image_set(catalog: Any, index: list[int], labels: np.ndarray, cfg: DataConfig) -> ImageSet:
    """The ImageSet of `catalog.entries[index]`, in that order."""
    entries = [catalog.entries[i] for i in index]
    names = [e.name for e in entries]
    limits = Limits(cfg.min_image_size, cfg.max_image_pixels)
    return ImageSet(LazyImages(catalog.blobs, [e.key for e in entries], names, limits),
                    labels[np.asarray(index, dtype=np.int64)], list(catalog.classes), [e.id for e in entries], names)
