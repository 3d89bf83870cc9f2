"""Classify image files with a trained run: the top-k classes and their probabilities per image."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlfit.checkpoint import load_checkpoint
from vlfit.config import load_config
from vlfit.data import eval_transform
from vlfit.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first


def find_images(paths: list[Path]) -> list[Path]:
    """Files named directly, then the image files (by suffix) under each folder, recursively and sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            found += inside
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def predict(run_dir: Path, paths: list[Path], top_k: int = 5, checkpoint: str = "best",
            batch_size: int | None = None) -> Iterator[Prediction]:
    """Yield a Prediction per image under `paths`, from the run's `checkpoint`, preprocessed exactly as
    its validation images were. `top_k` is capped at the number of classes."""
    from vlfit.train import make_accelerator  # heavy: only once the arguments are known to be good

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a vlfit run directory (no config.yaml)")
    files = find_images(paths)
    cfg = load_config(run_dir / "config.yaml")
    accelerator = make_accelerator(cfg.train)
    model, state = load_checkpoint(run_dir / "checkpoints" / checkpoint, accelerator.device)
    model.eval()
    transform = eval_transform(model.backbone.preprocess)
    classes = state["classes"]
    k = min(top_k, len(classes))
    batch_size = batch_size or cfg.train.eval_batch
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        pixels = torch.stack([transform(read_image(f)) for f in chunk]).to(accelerator.device)
        with torch.inference_mode(), accelerator.autocast():
            probs = model(pixels).float().softmax(dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for f, v, i in zip(chunk, values.tolist(), indices.tolist()):
            yield Prediction(f, [(classes[c], p) for c, p in zip(i, v)])


def read_image(path: Path) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor, turned upright as its EXIF orientation says."""
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def write_csv(predictions: list[Prediction], path: Path) -> None:
    """One row per (image, rank): path, rank (1 = most probable), class, probability."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rank", "class", "probability"])
        for p in predictions:
            for rank, (name, prob) in enumerate(p.top, 1):
                writer.writerow([str(p.path), rank, name, f"{prob:.6f}"])
