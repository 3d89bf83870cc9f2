"""Images to measure pixel fidelity on, the two measures, and the references they are taken against.

Used by tests/test_fidelity.py and by scripts/fidelity.py (the table in BENCHMARKS.md).

- `har_like_jpegs`: synthetic-har scenes resized to HAR's thumbnail sizes, both orientations, with
  sensor-like noise, JPEG-encoded at quality 85 and decoded by vlfit's own `decode`, as a run reads
  HAR's files;
- `pink_noise`: 1/f noise, the power spectrum of natural photographs, with detail at every scale;
- `psnr` and `high_frequency_ratio`: how far an output is from the reference, and how much of the
  reference's fine detail (the upper half of the frequency band) it keeps: a blur shows in the second
  long before it costs much of the first.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import transformers
from PIL import Image

from vlfit.data.images import Limits, decode
from vlfit.data.synthetic import make_synthetic_har

# (h, w): HAR's widths run from 84 to 478 px; thumbnails of both orientations, odd and even sides.
HAR_SIZES = [(160, 240), (240, 160), (84, 126), (126, 84), (183, 275), (275, 183), (320, 480), (480, 320),
             (300, 300), (97, 145)]
NOISE_SIZES = [(224, 336), (336, 224), (150, 201), (480, 480), (90, 120)]


def har_like_jpeg_files(sizes=HAR_SIZES, seed: int = 0) -> list[bytes]:
    """JPEG files (quality 85) of synthetic-har scenes at the given (h, w), with sensor-like noise."""
    rng = np.random.default_rng(seed)
    drawings, _ = make_synthetic_har(len(sizes), 128, seed=seed)
    out = []
    for drawing, (h, w) in zip(drawings, sizes):
        pixels = np.asarray(Image.fromarray(drawing).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0.0, 6.0, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def har_like_jpegs(sizes=HAR_SIZES, seed: int = 0) -> list[np.ndarray]:
    """`har_like_jpeg_files`, decoded as a run decodes its files."""
    return [decode(blob, Limits()) for blob in har_like_jpeg_files(sizes, seed)]


def pink_noise(sizes=NOISE_SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
        f[0, 0] = 1.0
        spectrum = (rng.normal(size=(3, *f.shape)) + 1j * rng.normal(size=(3, *f.shape))) / f
        x = np.fft.irfft2(spectrum, s=(h, w))
        x = (x - x.mean()) / x.std() * 50 + 128
        out.append(np.clip(x, 0, 255).round().astype(np.uint8).transpose(1, 2, 0))
    return out


def psnr(ours: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images on the 0-255 scale."""
    mse = np.mean((np.asarray(ours, np.float64) - np.asarray(reference, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def high_frequency_ratio(ours: np.ndarray, reference: np.ndarray) -> float:
    """Energy of `ours` over that of `reference` at spatial frequencies above a quarter cycle per pixel
    (the upper half of the band), per (3, H, W) image; 1 for an equally sharp image, < 1 for a blur."""
    def energy(x):
        x = np.asarray(x, np.float64)
        spectrum = np.abs(np.fft.rfft2(x - x.mean(axis=(-2, -1), keepdims=True))) ** 2
        h, w = x.shape[-2:]
        f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
        return spectrum[..., f > 0.25].sum()

    return float(energy(ours) / energy(reference))


def to_pixels(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (3, H, W) -> the 0-255 values it was made from."""
    m, s = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (mean, std))
    return ((x.double() * s + m) * 255).numpy()


def processors(family: str, size: int = 224) -> dict[str, object]:
    """Every image processor class this transformers has for the family (torchvision- and PIL-backed),
    configured as the B/16-224 hub checkpoints ship them."""
    names = {"clip": ["CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"],
             "siglip": ["SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil"]}[family]
    kwargs = ({"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}} if family == "clip"
              else {"size": {"height": size, "width": size}})
    found, classes = {}, set()
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None and cls not in classes:  # (5.x keeps *Fast as an alias of the plain name)
            classes.add(cls)
            try:
                found[name] = cls(**kwargs)
            except ImportError:  # e.g. a torchvision-backed class without torchvision
                continue
    return found
