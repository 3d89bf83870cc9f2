"""Augmentation of whole batches on the training device, from the image cache's uint8 pixels.

The cache stores each image squashed to S x S together with its original (h, w). Crop boxes are
drawn in original-image coordinates exactly as torchvision's `RandomResizedCrop.get_params` draws
them (a (scale, log-ratio) pair per attempt, the first of ten attempts that fits, else a centre
crop clamped to the ratio range), for all images at once; then they are mapped into the S x S frame
and every crop is resampled to the model's input with one `roi_align` call, which averages several
bilinear samples per output pixel when it shrinks (an antialiased resize). Flip and the backbone's
normalisation follow. The evaluation transform is a fixed box per image: the centre square (resize
the short side + centre crop, CLIP) or the whole image (squash, SigLIP).

Each image's random numbers are a function of (seed, epoch, image), drawn on the CPU with the
batch (`vlfit.resume.sample_uniforms`): a run is reproducible, a resumed epoch redraws the crops
of its remaining batches exactly, and the number of processes or workers changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from vlfit.data.cache import ImageCache
from vlfit.models.backbones import Preprocess
from vlfit.resume import SharedEpoch, sample_uniforms

_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
CROP_DRAWS = 4 * _ATTEMPTS  # (scale, ratio, top, left) per attempt


def sample_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                      u: torch.Tensor) -> torch.Tensor:
    """(B, 2) original (h, w) and (B, CROP_DRAWS) uniforms in [0, 1) -> (B, 4) integer crop boxes
    (x0, y0, x1, y1), distributed as RandomResizedCrop's."""
    h, w = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # (B, 1)
    u = u.double().view(-1, _ATTEMPTS, 4)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # (B, attempts)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first attempt that fits (0 if none)
    cw, ch = cw.gather(1, first), ch.gather(1, first)
    # torch.randint(0, n) for each image: floor(u * n) with u in [0, 1)
    y0 = torch.floor(u[..., 2].gather(1, first) * (h - ch + 1))
    x0 = torch.floor(u[..., 3].gather(1, first) * (w - cw + 1))

    # No attempt fits: the centre crop with the image's aspect clamped to the ratio range.
    in_ratio = w / h
    fw = torch.where(in_ratio < ratio[0], w, torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w))
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    fy0, fx0 = torch.floor((h - fh) / 2), torch.floor((w - fw) / 2)
    found = fits.any(dim=1, keepdim=True)
    x0, y0 = torch.where(found, x0, fx0), torch.where(found, y0, fy0)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    return torch.cat([x0, y0, x0 + cw, y0 + ch], dim=1).float()


def eval_boxes(sizes: torch.Tensor, resize: str) -> torch.Tensor:
    """(B, 2) original (h, w) -> (B, 4) the region the eval transform keeps: the centre square, or all of it."""
    h, w = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    if resize == "squash":
        return torch.cat([torch.zeros_like(w), torch.zeros_like(h), w, h], dim=1)
    side = torch.minimum(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return torch.cat([x0, y0, x0 + side, y0 + side], dim=1)


def crop_resize(pixels: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, out: int) -> torch.Tensor:
    """Cached uint8 (B, 3, S, S) + original (h, w) + boxes in original coordinates -> float (B, 3, out, out) in
    [0, 255]: each box resized to out x out, as if cut from the original image."""
    side = pixels.shape[-1]
    scale = side / sizes.flip(1).float().repeat(1, 2)  # (w, h, w, h): original -> cached frame
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes * scale], 1)
    # aligned=True: pixel i covers [i, i + 1), so box edges are pixel edges, as in a crop + resize.
    return roi_align(pixels.float(), rois, output_size=out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class _Normalize:
    def __init__(self, pre: Preprocess):
        std = torch.tensor(pre.std, dtype=torch.float32)
        self.mul = (1 / (255 * std)).view(1, 3, 1, 1)
        self.add = (-torch.tensor(pre.mean, dtype=torch.float32) / std).view(1, 3, 1, 1)
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 255] -> (x / 255 - mean) / std, in place."""
        if x.device not in self.on_device:
            # Copied once: a copy from pageable host memory every step would make the host wait for the GPU.
            self.on_device[x.device] = (self.mul.to(x.device), self.add.to(x.device))
        mul, add = self.on_device[x.device]
        return x.mul_(mul).add_(add)


class TrainAugment:
    """Random resized crop + horizontal flip + normalisation of a cached batch, on the batch's device."""

    draws = CROP_DRAWS + 1  # uniforms per image: the crop's, then the flip's

    def __init__(self, pre: Preprocess, scale: tuple[float, float], ratio: tuple[float, float], hflip: float):
        self.out = pre.image_size
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.normalize = _Normalize(pre)

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S), original (h, w) (B, 2), uniforms (B, draws) -> normalised float (B, 3, out, out)."""
        boxes = sample_crop_boxes(sizes, self.scale, self.ratio, u[:, :CROP_DRAWS])
        x = crop_resize(pixels, sizes, boxes, self.out)
        flip = u[:, CROP_DRAWS] < self.hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.normalize(x)


class EvalResize:
    """The backbone's evaluation resize (+ centre crop) and normalisation of a cached batch."""

    draws = 0

    def __init__(self, pre: Preprocess):
        self.out, self.resize = pre.image_size, pre.resize
        self.normalize = _Normalize(pre)

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        return self.normalize(crop_resize(pixels, sizes, eval_boxes(sizes, self.resize), self.out))


class CachedImages(Dataset):
    """The images `index` selects from a cache, served a whole batch at a time.

    A batch is ((uint8 pixels (B, 3, S, S), original sizes (B, 2), uniforms (B, draws)), labels (B,)):
    `device_transform` turns the first part into model inputs once the batch is on the device (see
    `on_device`), with the uniforms of each image drawn from (seed, epoch, its position).
    """

    def __init__(self, cache: ImageCache, index: np.ndarray, labels: np.ndarray, device_transform, seed: int = 0):
        self.cache = cache
        self.index = np.asarray(index, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.device_transform = device_transform
        self.seed = seed
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: list[int]):
        rows = self.index[positions]
        pixels = torch.from_numpy(self.cache.pixels[rows])  # fancy indexing copies out of the memory map
        sizes = torch.from_numpy(self.cache.sizes[rows])
        u = torch.from_numpy(sample_uniforms(self.seed, self.epoch.get(), positions, self.device_transform.draws))
        return (pixels, sizes, u), self.labels[positions]

    def __getitem__(self, i: int):
        (pixels, sizes, u), labels = self.__getitems__([i])
        return (pixels[0], sizes[0], u[0]), labels[0]


def batches_as_is(batch):
    """collate_fn for `CachedImages`: its `__getitems__` already returns a batch."""
    return batch


class DeviceTransformed:
    """A loader whose batches go through its dataset's `device_transform` after they reach the device."""

    def __init__(self, loader, transform, device: torch.device | None = None):
        self.loader = loader
        self.transform = transform
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if self.device is not None:
                batch = send_to_device(batch, self.device, non_blocking=True)
            inputs, labels = batch
            yield self.transform(*inputs), labels

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def on_device(loader, device: torch.device | None = None):
    """`loader` with its dataset's device-side transform applied to every batch; unchanged if it has none.

    Call it on a loader that already puts batches on the device (after `accelerator.prepare`), or
    name the `device` to move each batch there first.
    """
    transform = getattr(getattr(loader, "dataset", None), "device_transform", None)
    return DeviceTransformed(loader, transform, device) if transform is not None else loader

