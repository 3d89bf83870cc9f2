"""Loaders that feed a backbone: the training split shuffled and augmented, evaluation in order.

Two pipelines (`data.pipeline`): `cached` reads decoded images from the image cache and leaves crop,
flip and normalisation to the training device (`vlfit.data.gpu_transforms.on_device`);
`torchvision` decodes and transforms every image on the CPU, the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from vlfit.config import Config
from vlfit.data.cache import cache_side, open_cache
from vlfit.data.gpu_transforms import CachedImages, EvalResize, TrainAugment, batches_as_is
from vlfit.data.sources import ImageSet, TransformedImages
from vlfit.data.split import Split
from vlfit.data.transforms import eval_transform, train_transform
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
    workers. With `data.pipeline: cached`, batches hold cached uint8 pixels: pass the prepared
    loader through `on_device` to crop, flip and normalise them on the device.
    """
    if cfg.data.pipeline == "cached":
        with PartialState().main_process_first():  # one process decodes; the others then find its entry
            cache = open_cache(images, cache_side(pre.image_size, cfg.data.cache_size), pre.interpolation,
                               cfg.data.cache_dir)
        transform = TrainAugment(pre, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip) if train \
            else EvalResize(pre)
        dataset = CachedImages(cache, index, images.labels[index], transform, seed=cfg.train.seed)
        batching = dict(collate_fn=batches_as_is)
    else:
        transform = train_transform(pre, cfg.data) if train else eval_transform(pre)
        dataset = TransformedImages(images.subset(index), transform)
        dataset = SeededSamples(dataset, cfg.train.seed) if train else dataset
        batching = {}
    options = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu", **batching)
    if train:
        return DataLoader(dataset, batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg.train.seed), **options)
    return DataLoader(dataset, batch_size=cfg.train.eval_batch, shuffle=False, **options)
