"""What turns stored uint8 images into model inputs: a plan drawn on the host, pixels computed on the device.

A loader yields `ImageBatch`es: the images of a batch at their own sizes in one flat buffer, and for
each image where every output pixel samples it (`resample.Axis`, in the stored image's pixels).
The plan comes from the transform: `TrainAugment` draws crop boxes in original-image coordinates
exactly as torchvision's `RandomResizedCrop.get_params` draws them (a (scale, log-ratio) pair per
attempt, the first of ten attempts that fits, else a centre crop clamped to the ratio range) and a
horizontal flip; `EvalResize` is the backbone's own processor: resize the shorter side and crop the
centre (CLIP), or resize to a square (SigLIP), with its integer rounding. Once the batch is on the
device the same transform resamples every image in one antialiased resampling
(`vlfit.data.resample`) and normalises it. The batch can come from the image cache
(`CachedImages`) or from images decoded on the spot (`DecodedImages`: prediction, the torchvision
pipeline's evaluation); both store an image as `cache.fit` does, so every path gives the same pixels.

Each image's random numbers are a function of (seed, epoch, image), drawn on the CPU with the
batch (`vlfit.resume.sample_uniforms`): a run is reproducible, a resumed epoch redraws the crops
of its remaining batches exactly, and the number of processes or workers changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset

from vlfit.data.cache import OFFSET, ORIGINAL, STORED, ImageCache, fit
from vlfit.data.resample import Axis, reach, resample
from vlfit.models.backbones import Preprocess
from vlfit.resume import SharedEpoch, sample_uniforms

_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
CROP_DRAWS = 4 * _ATTEMPTS  # (scale, ratio, top, left) per attempt


@dataclass
class ImageBatch:
    """A batch of images of different sizes, as it travels to the device.

    `pixels` holds every image's uint8 (3, h, w) pixels one after another; `shapes` their (h, w) and
    `taps` the `resample.reach` of rows and columns, kept on the host so that nothing waits for the
    device; `rows` and `cols` say where each output pixel samples its image, in stored pixels.
    """

    pixels: torch.Tensor
    shapes: list[tuple[int, int]]
    rows: Axis
    cols: Axis
    taps: tuple[int, int]

    def __len__(self) -> int:
        return len(self.shapes)

    def images(self) -> list[torch.Tensor]:
        """Views (3, h, w) of each image's pixels."""
        parts = self.pixels.split([3 * h * w for h, w in self.shapes])
        return [part.view(3, h, w) for part, (h, w) in zip(parts, self.shapes)]

    def to(self, device: torch.device, non_blocking: bool = False) -> ImageBatch:
        return replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking),
                       rows=self.rows.to(device, non_blocking), cols=self.cols.to(device, non_blocking))

    def pin_memory(self) -> ImageBatch:  # called by a DataLoader with pin_memory=True
        # All of it: a copy from pageable memory would make the host wait for it.
        return replace(self, pixels=self.pixels.pin_memory(), rows=self.rows.pin_memory(), cols=self.cols.pin_memory())


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


def crop_axes(boxes: torch.Tensor, out: int) -> tuple[Axis, Axis]:
    """(B, 4) boxes (x0, y0, x1, y1) -> the sampling of each box cut out and resized to out x out
    (RandomResizedCrop's crop, then resize: pixels outside the box take no part)."""
    x0, y0, x1, y1 = boxes.double().unbind(1)
    return Axis(y0, (y1 - y0) / out, y0, y1), Axis(x0, (x1 - x0) / out, x0, x1)


def eval_axes(sizes: torch.Tensor, pre: Preprocess) -> tuple[Axis, Axis]:
    """(B, 2) original (h, w) -> the sampling of the backbone's evaluation resize, as its image processor
    does it: resize to a square ("squash", SigLIP), or resize the shorter side to `pre.shortest_edge`
    (the longer one to int(side * long / short)) and crop the centre, the top-left corner at
    int((resized - crop) / 2) (CLIP)."""
    h, w = sizes.double().unbind(1)
    out = pre.image_size
    if pre.resize == "squash":
        rh, rw = torch.full_like(h, out), torch.full_like(w, out)
    else:
        side = pre.shortest_edge or out
        longer = torch.floor(side * torch.maximum(h, w) / torch.minimum(h, w))
        rh, rw = torch.where(w <= h, longer, side), torch.where(w <= h, side, longer)
    zero = torch.zeros_like(h)
    rows, cols = (Axis(torch.trunc((r - out) / 2) * n / r, n / r, zero, n) for r, n in ((rh, h), (rw, w)))
    return rows, cols


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


class _DeviceTransform:
    """Plans a batch on the host (`plan`), then resamples and normalises it on the device (`__call__`)."""

    draws = 0  # uniforms per image the plan needs

    def __init__(self, pre: Preprocess):
        self.out, self.kernel = pre.image_size, pre.interpolation
        self.normalize = _Normalize(pre)

    def plan(self, sizes: torch.Tensor, u: torch.Tensor) -> tuple[Axis, Axis]:
        """(B, 2) original (h, w), (B, draws) uniforms -> where each output pixel samples its original image."""
        raise NotImplementedError

    def __call__(self, batch: ImageBatch) -> torch.Tensor:
        """An ImageBatch -> normalised float (B, 3, out, out), on the batch's device."""
        return self.normalize(resample(batch.images(), batch.rows, batch.cols, self.out, self.kernel, batch.taps))


class TrainAugment(_DeviceTransform):
    """Random resized crop + horizontal flip + the backbone's normalisation."""

    draws = CROP_DRAWS + 1  # uniforms per image: the crop's, then the flip's

    def __init__(self, pre: Preprocess, scale: tuple[float, float], ratio: tuple[float, float], hflip: float):
        super().__init__(pre)
        self.scale, self.ratio, self.hflip = scale, ratio, hflip

    def plan(self, sizes, u):
        rows, cols = crop_axes(sample_crop_boxes(sizes, self.scale, self.ratio, u[:, :CROP_DRAWS]), self.out)
        return rows, cols.reversed(u[:, CROP_DRAWS] < self.hflip, self.out)


class EvalResize(_DeviceTransform):
    """The backbone's evaluation resize (+ centre crop) and normalisation."""

    def __init__(self, pre: Preprocess):
        super().__init__(pre)
        self.pre = pre

    def plan(self, sizes, u):
        return eval_axes(sizes, self.pre)


def image_batch(images: Sequence[np.ndarray] | np.ndarray, shapes: np.ndarray, sizes: np.ndarray,
                transform: _DeviceTransform, u: torch.Tensor) -> ImageBatch:
    """The ImageBatch of stored images (their flat pixels, or a sequence of (3, h, w) arrays) of stored
    `shapes` (B, 2) made from originals of `sizes` (B, 2), planned by `transform` with uniforms `u`."""
    rows, cols = transform.plan(torch.as_tensor(sizes), u)
    ratio = torch.as_tensor(shapes, dtype=torch.float64) / torch.as_tensor(sizes, dtype=torch.float64)
    rows, cols = rows.scaled(ratio[:, 0]), cols.scaled(ratio[:, 1])
    pixels = images if isinstance(images, np.ndarray) else np.concatenate([np.ravel(im) for im in images])
    return ImageBatch(torch.from_numpy(pixels), [tuple(s) for s in np.asarray(shapes).tolist()], rows, cols,
                      (reach(rows, transform.kernel), reach(cols, transform.kernel)))


class _PlannedImages(Dataset):
    """Images served a whole batch at a time as (ImageBatch, labels (B,)), planned by `device_transform`
    with the uniforms of each image drawn from (seed, epoch, its position). Subclasses read the pixels."""

    def __init__(self, labels: np.ndarray, device_transform: _DeviceTransform, seed: int = 0):
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.device_transform = device_transform
        self.seed = seed
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, positions: list[int]) -> tuple[Sequence[np.ndarray] | np.ndarray, np.ndarray, np.ndarray]:
        """(stored pixels, stored shapes (B, 2), original sizes (B, 2)) of the images at `positions`."""
        raise NotImplementedError

    def __getitems__(self, positions: list[int]) -> tuple[ImageBatch, torch.Tensor]:
        u = torch.from_numpy(sample_uniforms(self.seed, self.epoch.get(), positions, self.device_transform.draws))
        return image_batch(*self.read(positions), self.device_transform, u), self.labels[positions]

    def __getitem__(self, i: int) -> tuple[ImageBatch, torch.Tensor]:
        batch, labels = self.__getitems__([i])
        return batch, labels[0]


class CachedImages(_PlannedImages):
    """The images `index` selects from an image cache."""

    def __init__(self, cache: ImageCache, index: np.ndarray, labels: np.ndarray, device_transform, seed: int = 0):
        super().__init__(labels, device_transform, seed)
        self.cache = cache
        self.index = np.asarray(index, dtype=np.int64)

    def read(self, positions):
        rows = self.cache.index[self.index[positions]]
        starts, shapes, sizes = rows[:, OFFSET], rows[:, STORED], rows[:, ORIGINAL]
        pixels = self.cache.pixels
        # One copy out of the memory map, into the buffer the batch travels in.
        flat = np.concatenate([pixels[o:o + 3 * h * w] for o, (h, w) in zip(starts.tolist(), shapes.tolist())])
        return flat, shapes, sizes


class DecodedImages(_PlannedImages):
    """Images decoded when read (`images[i]`: RGB uint8 (H, W, 3)) and stored as the cache would store them."""

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, device_transform, limit: int,
                 interpolation: str = "bicubic", seed: int = 0):
        super().__init__(labels, device_transform, seed)
        self.images, self.limit, self.interpolation = images, limit, interpolation

    def read(self, positions):
        originals = [np.asarray(self.images[i]) for i in positions]
        stored = [fit(im, self.limit, self.interpolation).numpy() for im in originals]
        return stored, np.array([s.shape[1:] for s in stored]), np.array([im.shape[:2] for im in originals])


def batches_as_is(batch):
    """collate_fn for datasets whose `__getitems__` already returns a batch."""
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
            images, labels = batch
            yield self.transform(images), labels

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
