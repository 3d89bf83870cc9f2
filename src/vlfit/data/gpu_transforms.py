"""Augmentation of whole batches on the training device, from the image cache's uint8 pixels.

The cache stores each image squashed to S x S together with its original (h, w). Crop boxes are
drawn in original-image coordinates exactly as torchvision's `RandomResizedCrop.get_params` draws
them (a (scale, log-ratio) pair per attempt, the first of ten attempts that fits, else a centre
crop clamped to the ratio range), for all images at once; then they are mapped into the S x S frame
and every crop is resampled to the model's input with one `roi_align` call, which averages several
bilinear samples per output pixel when it shrinks (an antialiased resize). Flip and the backbone's
normalisation follow. The evaluation transform is a fixed box per image: the centre square (resize
the short side + centre crop, CLIP) or the whole image (squash, SigLIP).

Random numbers come from a generator seeded by (seed, process, epoch, batch), so a run is
reproducible and any batch of any epoch can be redrawn on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from vlfit.data.cache import ImageCache
from vlfit.models.backbones import Preprocess

_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


def sample_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator) -> torch.Tensor:
    """(B, 2) original (h, w) -> (B, 4) integer crop boxes (x0, y0, x1, y1), distributed as RandomResizedCrop's."""
    h, w = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # (B, 1)
    u = torch.rand(sizes.shape[0], _ATTEMPTS, 4, generator=generator, device=sizes.device, dtype=torch.float64)
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

    def __init__(self, pre: Preprocess, scale: tuple[float, float], ratio: tuple[float, float], hflip: float,
                 seed: int):
        self.out = pre.image_size
        self.scale, self.ratio, self.hflip, self.seed = scale, ratio, hflip, seed
        self.normalize = _Normalize(pre)

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor, step: tuple[int, int]) -> torch.Tensor:
        """uint8 (B, 3, S, S), original (h, w) (B, 2), (epoch, batch) -> normalised float (B, 3, out, out)."""
        g = torch.Generator(device=pixels.device).manual_seed(_seed(self.seed, _process_index(), *step))
        boxes = sample_crop_boxes(sizes, self.scale, self.ratio, g)
        x = crop_resize(pixels, sizes, boxes, self.out)
        flip = torch.rand(len(x), generator=g, device=x.device) < self.hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.normalize(x)


class EvalResize:
    """The backbone's evaluation resize (+ centre crop) and normalisation of a cached batch."""

    def __init__(self, pre: Preprocess):
        self.out, self.resize = pre.image_size, pre.resize
        self.normalize = _Normalize(pre)

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor, step: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return self.normalize(crop_resize(pixels, sizes, eval_boxes(sizes, self.resize), self.out))


class CachedImages(Dataset):
    """The images `index` selects from a cache, served a whole batch at a time.

    A batch is ((uint8 pixels (B, 3, S, S), original sizes (B, 2)), labels (B,)); `device_transform`
    turns the pixel part into model inputs once the batch is on the device (see `on_device`).
    """

    def __init__(self, cache: ImageCache, index: np.ndarray, labels: np.ndarray, device_transform):
        self.cache = cache
        self.index = np.asarray(index, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.device_transform = device_transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: list[int]):
        rows = self.index[positions]
        pixels = torch.from_numpy(self.cache.pixels[rows])  # fancy indexing copies out of the memory map
        sizes = torch.from_numpy(self.cache.sizes[rows])
        return (pixels, sizes), self.labels[positions]

    def __getitem__(self, i: int):
        (pixels, sizes), labels = self.__getitems__([i])
        return (pixels[0], sizes[0]), labels[0]


def batches_as_is(batch):
    """collate_fn for `CachedImages`: its `__getitems__` already returns a batch."""
    return batch


class DeviceTransformed:
    """A loader whose batches go through its dataset's `device_transform` after they reach the device."""

    def __init__(self, loader, transform):
        self.loader = loader
        self.transform = transform
        self._epochs = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Accelerate's loaders count their epochs (and a resumed run sets the count); plain ones are counted here.
        epoch = getattr(self.loader, "iteration", self._epochs)
        self._epochs += 1
        for batch, ((pixels, sizes), labels) in enumerate(self.loader):
            yield self.transform(pixels, sizes, (epoch, batch)), labels

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def on_device(loader):
    """`loader` with its dataset's device-side transform applied to every batch; unchanged if it has none.

    Call it on a loader that already puts batches on the device (after `accelerator.prepare`).
    """
    transform = getattr(getattr(loader, "dataset", None), "device_transform", None)
    return DeviceTransformed(loader, transform) if transform is not None else loader


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
