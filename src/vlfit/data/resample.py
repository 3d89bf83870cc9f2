"""Antialiased resampling of a batch of images of different sizes, as PIL and torchvision resize them.

Each output pixel is a weighted sum of the source pixels under a filter kernel centred on it; when
shrinking, the kernel is widened by the shrink factor (antialiasing). This is the scheme of PIL's
`Image.resize` and of torchvision's `resize(..., antialias=True)`, which the models' own image
processors call, written as two matrix products per image (rows, then columns) so that a whole
batch runs on the training device at once and any crop box, integer or not, is resampled directly
from the stored pixels: one resampling, never a resample of a resample.

An axis of an output image is described by `Axis` values in source-pixel units: output pixel i is
centred at `start + (i + 0.5) * step`, and only source pixels whose centres lie in [lo, hi) take
part (the crop, for a crop that is cut before it is resized; the whole image, for a centre crop
of a resized image). Weights are normalised over the pixels that take part, as PIL does at borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch


def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5, support 2); torchvision's antialiased bicubic uses the same."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bilinear(x: torch.Tensor) -> torch.Tensor:
    """The triangle kernel (support 1)."""
    return (1 - x.abs()).clamp(min=0)


KERNELS = {"bicubic": (bicubic, 2.0), "bilinear": (bilinear, 1.0)}


@dataclass
class Axis:
    """Where the `out` pixels of one axis sample their source, per image; every field is (B,) float."""

    start: torch.Tensor
    step: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def scaled(self, factor: torch.Tensor) -> Axis:
        """The same sampling in a frame `factor` times as large (an image stored at another size)."""
        return Axis(*(getattr(self, f.name) * factor for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> Axis:
        return Axis(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def pin_memory(self) -> Axis:
        return Axis(*(getattr(self, f.name).pin_memory() for f in fields(self)))

    def reversed(self, flip: torch.Tensor, out: int) -> Axis:
        """Output pixel i becomes pixel out - 1 - i where `flip` (B,) is true: a horizontal mirror."""
        first = self.start + out * self.step  # the far edge, walked backwards
        return replace(self, start=torch.where(flip, first, self.start), step=torch.where(flip, -self.step, self.step))


def reach(axis: Axis, kernel: str = "bicubic") -> int:
    """How many source pixels one output pixel of the batch can draw on: the kernel's support on both
    sides, widened by the largest shrink factor. A host number, taken where the plan is made."""
    _, support = KERNELS[kernel]
    return 2 * math.ceil(support * max(1.0, float(axis.step.abs().max()))) + 1


def axis_weights(axis: Axis, out: int, length: int, taps: int, kernel: str = "bicubic") -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(B, out, length) float32 weights: row i holds the contribution of every source pixel to output
    pixel i; and (B, 2) the range [first, stop) of source pixels any of them uses.

    Only the `taps` pixels around each output pixel's centre are evaluated (`reach`). Source pixels past
    `length` (padding) and outside [lo, hi) get zero weight; each row sums to one.
    """
    fn, support = KERNELS[kernel]
    device = axis.start.device
    scale = axis.step.abs().clamp(min=1.0)[:, None]  # (B, 1): the kernel widens when shrinking
    centres = axis.start[:, None] + (torch.arange(out, device=device, dtype=torch.float64) + 0.5) * axis.step[:, None]
    first = torch.floor(centres - support * scale + 0.5)  # (B, out): the first pixel whose centre is within reach
    index = first[..., None] + torch.arange(taps, device=device, dtype=torch.float64)  # (B, out, taps)
    weights = fn((index + 0.5 - centres[..., None]) / scale[..., None])
    inside = ((index + 0.5 >= axis.lo[:, None, None]) & (index + 0.5 < axis.hi[:, None, None])
              & (index >= 0) & (index < length))
    weights = weights * inside
    weights = weights / torch.where((total := weights.sum(-1, keepdim=True)) == 0, 1.0, total)
    index = index.clamp(0, length - 1).long()  # out-of-range taps carry zero weight
    dense = torch.zeros(len(index), out, length, device=device).scatter_add_(2, index, weights.float())
    used = torch.stack([index[:, :, 0].amin(1), index[:, :, -1].amax(1) + 1], 1)
    return dense, used


def resample(images: list[torch.Tensor], rows: Axis, cols: Axis, out: int, kernel: str = "bicubic",
             taps: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 images (3, h_b, w_b) and per-image sampling -> float32 (B, 3, out, out), whole numbers in [0, 255].

    `taps`: `reach` of the rows and columns, if known on the host (else computed here, which waits
    for the device). On a GPU the images are padded to the batch's largest and resampled in two batched
    products (the padding has zero weight); on a CPU, where the padding costs more than the batching
    saves, one image at a time over the pixels its crop uses. Both compute the same sums.
    """
    device = images[0].device
    rows, cols = rows.to(device), cols.to(device)
    taps = taps or (reach(rows, kernel), reach(cols, kernel))
    wy, used_y = axis_weights(rows, out, max(im.shape[1] for im in images), taps[0], kernel)  # (B, out, H)
    wx, used_x = axis_weights(cols, out, max(im.shape[2] for im in images), taps[1], kernel)  # (B, out, W)
    x = padded_products(images, wy, wx) if images[0].is_cuda else image_products(images, wy, wx, used_y, used_x)
    # Bicubic overshoots: clipped, and rounded to whole values, as the uint8 resizes of PIL, torchvision and
    # the models' processors are; the models were trained on such 8-bit inputs.
    return x.clamp_(0, 255).round_()


def padded_products(images: list[torch.Tensor], wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """wy @ image @ wx.T for every image at once, the images zero-padded to (H, W)."""
    padded = images[0].new_zeros(len(images), 3, wy.shape[-1], wx.shape[-1])
    for b, im in enumerate(images):
        padded[b, :, : im.shape[1], : im.shape[2]] = im
    return wy[:, None] @ padded.float() @ wx[:, None].transpose(-1, -2)


def image_products(images: list[torch.Tensor], wy: torch.Tensor, wx: torch.Tensor, used_y: torch.Tensor,
                   used_x: torch.Tensor) -> torch.Tensor:
    """wy @ image @ wx.T one image at a time, over only the rows and columns its weights use."""
    out = []
    for b, (im, (y0, y1), (x0, x1)) in enumerate(zip(images, used_y.tolist(), used_x.tolist())):
        y1, x1 = min(y1, im.shape[1]), min(x1, im.shape[2])
        out.append(wy[b, :, y0:y1] @ im[:, y0:y1, x0:x1].float() @ wx[b, :, x0:x1].T)
    return torch.stack(out)
