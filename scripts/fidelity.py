"""How close vlfit's model inputs are to what each backbone's own image processor and torchvision produce.

    python scripts/fidelity.py [--size 224]

Prints, per reference and image kind, the worst and median PSNR (dB) and high-frequency energy ratio
over the images of tests/fidelity.py, for evaluation through the image cache (training's validation,
`vlfit eval`, zero-shot, the probe) and through images decoded on the spot (`vlfit predict`), and
for training crops against torchvision's RandomResizedCrop with the same boxes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fidelity import har_like_jpegs, high_frequency_ratio, pink_noise, processors, psnr, to_pixels  # noqa: E402

from vlfit.config import load_config  # noqa: E402
from vlfit.data import ImageSet  # noqa: E402
from vlfit.data.cache import open_cache  # noqa: E402
from vlfit.data.gpu_transforms import (CROP_DRAWS, CachedImages, DecodedImages, EvalResize, TrainAugment,  # noqa: E402
                                       crop_axes, sample_crop_boxes)
from vlfit.data.loaders import stored_limit  # noqa: E402
from vlfit.data.resample import resample  # noqa: E402
from vlfit.models.backbones import ClipBackbone, Preprocess, SiglipBackbone  # noqa: E402
from vlfit.resume import sample_uniforms  # noqa: E402

CFG = load_config(None)  # the default data settings: crop scale (0.5, 1), ratio (3/4, 4/3)


def preprocess(family: str, size: int) -> Preprocess:
    cls = {"clip": ClipBackbone, "siglip": SiglipBackbone}[family]
    return Preprocess(image_size=size, **cls.default_preprocess)


def cached(images: list[np.ndarray], pre: Preprocess, root: Path):
    ids = [f"fidelity/{i}/{im.shape}/{int(im.sum())}" for i, im in enumerate(images)]
    return open_cache(ImageSet(images, np.zeros(len(images), int), ["a"], ids), stored_limit(CFG, pre),
                      pre.interpolation, root, show=False)


def eval_outputs(images: list[np.ndarray], pre: Preprocess, root: Path) -> dict[str, torch.Tensor]:
    """vlfit's evaluation inputs of `images`, through the cache and through decoded images."""
    n, limit = len(images), stored_limit(CFG, pre)
    cache = cached(images, pre, root)
    transform = EvalResize(pre)
    out = {}
    for name, dataset in [("cache", CachedImages(cache, np.arange(n), np.zeros(n), transform)),
                          ("decoded", DecodedImages(images, np.zeros(n), transform, limit, pre.interpolation))]:
        batch, _ = dataset.__getitems__(list(range(n)))
        out[name] = transform(batch)
    return out


def crop_outputs(images: list[np.ndarray], pre: Preprocess, root: Path, seed: int = 0):
    """(vlfit's training crops, torchvision's resized_crop of the originals) for the same boxes, drawn as
    RandomResizedCrop draws them with the default data settings."""
    n, cache = len(images), cached(images, pre, root)
    u = torch.from_numpy(sample_uniforms(seed, 0, np.arange(n), CROP_DRAWS))
    boxes = sample_crop_boxes(torch.tensor(cache.sizes), CFG.data.crop_scale, CFG.data.crop_ratio, u).double()
    dataset = CachedImages(cache, np.arange(n), np.zeros(n), TrainAugment(pre, (1, 1), (1, 1), 0.0))
    batch, _ = dataset.__getitems__(list(range(n)))
    rows, cols = crop_axes(boxes, pre.image_size)
    ratio = torch.tensor([s for s in batch.shapes], dtype=torch.float64) / torch.tensor(cache.sizes, dtype=torch.float64)
    ours = resample(batch.images(), rows.scaled(ratio[:, 0]), cols.scaled(ratio[:, 1]), pre.image_size)
    theirs = [TF.resized_crop(torch.from_numpy(im).permute(2, 0, 1), int(b[1]), int(b[0]), int(b[3] - b[1]),
                              int(b[2] - b[0]), [pre.image_size] * 2, InterpolationMode.BICUBIC, antialias=True)
              for im, b in zip(images, boxes.tolist())]
    return ours.numpy(), [t.double().numpy() for t in theirs]


def rows_of(name: str, pairs) -> str:
    p = [psnr(a, b) for a, b in pairs]
    r = [high_frequency_ratio(a, b) for a, b in pairs]
    return f"| {name} | {min(p):.1f} | {np.median(p):.1f} | {min(r):.3f} | {np.median(r):.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    kinds = {"HAR-like JPEGs": har_like_jpegs(), "1/f noise": pink_noise(),
             "1/f noise, larger than the cache keeps": pink_noise([(900, 1400), (1400, 900), (1000, 1000)])}
    print("| reference, images: vlfit path | worst PSNR (dB) | median PSNR | worst HF ratio | median HF ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for family in ("clip", "siglip"):
            pre = preprocess(family, args.size)
            for kind, images in kinds.items():
                ours = eval_outputs(images, pre, Path(root))
                for proc_name, proc in processors(family, args.size).items():
                    ref = proc(images=images, return_tensors="pt")["pixel_values"]
                    ref_px = [to_pixels(r, pre.mean, pre.std) for r in ref]
                    for path, x in ours.items():
                        ours_px = [to_pixels(o, pre.mean, pre.std) for o in x]
                        print(rows_of(f"{proc_name}, {kind}: eval via {path}", list(zip(ours_px, ref_px))))
        pre = preprocess("clip", args.size)
        for kind, images in kinds.items():
            ours, theirs = crop_outputs(images, pre, Path(root))
            print(rows_of(f"torchvision resized_crop (bicubic, antialias), {kind}: training crop",
                          list(zip(ours, theirs))))


if __name__ == "__main__":
    main()
