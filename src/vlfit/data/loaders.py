"""Loaders that feed a backbone: the training split shuffled and augmented, evaluation in order.

Two pipelines (`data.pipeline`): `cached` reads decoded images from the image cache and leaves crop,
flip, resize and normalisation to the training device (`vlfit.data.gpu_transforms.on_device`);
`torchvision` decodes and augments every training image on the CPU with torchvision's transforms,
the reference. Evaluation has one path on both: the backbone's own resize, computed on the device
from the images as the cache stores them, so validation, `vlfit eval`, zero-shot scores, a probe's
features and `vlfit predict` all see the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from vlfit.config import Config
from vlfit.data.cache import open_cache, size_limit
from vlfit.data.gpu_transforms import CachedImages, DecodedImages, EvalResize, TrainAugment, batches_as_is
from vlfit.data.sources import ImageSet, TransformedImages
from vlfit.data.split import Split
from vlfit.data.transforms import train_transform
from vlfit.errors import UserError
from vlfit.models.backbones import Preprocess
from vlfit.resume import SeededSamples


def make_loaders(cfg: Config, images: ImageSet, split: Split, pre: Preprocess) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over the split, with the backbone's own preprocessing."""
    if len(split.train) < cfg.train.micro_batch:
        raise UserError(f"train.micro_batch: {cfg.train.micro_batch} is larger than the training split "
                        f"({len(split.train)} images)")
    return make_loader(cfg, images, split.train, pre, train=True), make_loader(cfg, images, split.val, pre, train=False)


def make_loader(cfg: Config, images: ImageSet, index: np.ndarray, pre: Preprocess, train: bool) -> DataLoader:
    """A loader over images[index]: shuffled, whole batches, augmented for training; in order with the
    evaluation transform otherwise.

    Training augmentation is a function of (seed, epoch, image) on both pipelines: what makes a
    resumed epoch draw the same crops, and the crops independent of the number of processes and
    workers. Batches of the cached pipeline, and evaluation batches of both, hold uint8 images at
    their stored sizes: pass the prepared loader through `on_device` to turn them into model inputs.
    """
    limit = stored_limit(cfg, pre)
    if cfg.data.pipeline == "cached":
        with PartialState().main_process_first():  # one process decodes; the others then find its entry
            cache = open_cache(images, limit, pre.interpolation, cfg.data.cache_dir)
        transform = TrainAugment(pre, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip) if train \
            else EvalResize(pre)
        dataset = CachedImages(cache, index, images.labels[index], transform, seed=cfg.train.seed)
        batching = dict(collate_fn=batches_as_is)
    elif train:
        dataset = SeededSamples(TransformedImages(images.subset(index), train_transform(pre, cfg.data)), cfg.train.seed)
        batching = {}
    else:
        subset = images.subset(index)
        dataset = DecodedImages(subset.images, subset.labels, EvalResize(pre), limit, pre.interpolation)
        batching = dict(collate_fn=batches_as_is)
    options = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu", **batching)
    if train:
        return DataLoader(dataset, batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg.train.seed), **options)
    return DataLoader(dataset, batch_size=cfg.train.eval_batch, shuffle=False, **options)


def stored_limit(cfg: Config, pre: Preprocess) -> int:
    """The shorter side up to which images are kept as they are (`vlfit.data.cache.stored_size`)."""
    return size_limit(max(pre.image_size, pre.shortest_edge or 0), cfg.data.crop_scale[0], cfg.data.cache_size)
