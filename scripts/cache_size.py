"""Size and build time of the image cache for HAR-sized JPEGs at a backbone's real input size.

    python scripts/cache_size.py [--images 10000] [--size 224] [--data-dir DIR]

Writes (or reuses) `vlfit bench`'s generated HAR-like JPEGs, builds the cache a training run at
`--size` px would build (CLIP preprocessing, the default data settings, every core), and prints its
size on disk, per 10,000 images, and the build time. Uses only `make_loader` and `_jpeg_image_set`,
so it measures the cache of whichever vlfit is on the import path.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from vlfit.bench import _jpeg_image_set, make_jpeg_dataset
from vlfit.config import load_config
from vlfit.data.loaders import make_loader
from vlfit.models.backbones import ClipBackbone, Preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = args.data_dir or Path(work) / "jpegs"
        stats = make_jpeg_dataset(data, args.images, show=False)
        images = _jpeg_image_set(data)
        cfg = load_config(None, [f"data.cache_dir={work}/cache"])
        pre = Preprocess(image_size=args.size, **ClipBackbone.default_preprocess)
        cache = make_loader(cfg, images, np.arange(len(images)), pre, train=True).dataset.cache
        size = sum(f.stat().st_size for f in cache.path.iterdir())
        print(json.dumps({"images": len(images), "jpeg_mean_kb": round(stats["mean_kb"], 1), "input_size": args.size,
                          "cache_bytes": size, "gib_per_10000_images": round(size / len(images) * 1e4 / 2**30, 3),
                          "build_seconds": round(cache.meta["build_seconds"], 1), "entry": cache.path.name}))


if __name__ == "__main__":
    main()
