"""Classify image files with a trained run: the top-k classes and their probabilities per image."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from vlfit.checkpoint import load_checkpoint
from vlfit.config import load_config
from vlfit.data.gpu_transforms import DecodedImages, EvalResize
from vlfit.data.images import BadImage, Limits, decode, unreadable
from vlfit.data.loaders import stored_limit
from vlfit.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first; empty when the file is unusable
    problem: str | None = None  # why the file could not be classified


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
    """Yield a Prediction per image under `paths`, from the run's `checkpoint`, decoded as training decoded
    its images and resized as its validation images were (the same `decode`, `cache.fit` and
    `EvalResize`). A file that is not a usable image under the run's data limits yields its problem
    instead; when no file is usable, that is a UserError after they are all yielded. `top_k` is capped
    at the number of classes.

    Under a launcher each process classifies its share of every chunk of images, and the main
    process yields them all, in order; the others yield nothing."""
    from vlfit.train import make_accelerator  # heavy: only once the arguments are known to be good

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a vlfit run directory (no config.yaml)")
    files = find_images(paths)
    cfg = load_config(run_dir / "config.yaml")
    accelerator = make_accelerator(cfg.train)
    model, state = load_checkpoint(run_dir / "checkpoints" / checkpoint, accelerator.device)
    model.eval()
    pre = model.backbone.preprocess
    transform, limit = EvalResize(pre), stored_limit(cfg, pre)
    limits = Limits(cfg.data.min_image_size, cfg.data.max_image_pixels)
    classes = state["classes"]
    k = min(top_k, len(classes))
    step = (batch_size or cfg.train.eval_batch) * accelerator.num_processes
    classified = 0
    for start in range(0, len(files), step):
        with accelerator.split_between_processes(files[start:start + step]) as mine:  # contiguous shares
            decoded = [read_image(f, limits) for f in mine]
            usable = [im for im in decoded if not isinstance(im, str)]
            probs = iter(())
            if usable:
                images = DecodedImages(usable, np.zeros(len(usable)), transform, limit, pre.interpolation)
                batch, _ = images.__getitems__(list(range(len(usable))))
                with torch.inference_mode(), accelerator.autocast():
                    logits = model(transform(batch.to(accelerator.device)))
                values, indices = logits.float().softmax(dim=-1).topk(k, dim=-1)
                probs = zip(values.tolist(), indices.tolist())
            found = [Prediction(f, [], im) if isinstance(im, str) else
                     Prediction(f, [(classes[c], p) for p, c in zip(*next(probs))])
                     for f, im in zip(mine, decoded)]
        found = gather_object(found)  # every process's share, in file order
        classified += sum(p.problem is None for p in found)
        if accelerator.is_main_process:
            yield from found
    if not classified:
        raise UserError(f"no usable image among the {len(files)} files given (each is listed with its problem)"
                        if len(files) > 1 else f"{files[0]}: {found[0].problem}")


def read_image(path: Path, limits: Limits) -> np.ndarray | str:
    """An image file's RGB uint8 pixels (H, W, 3), decoded as training decodes, or why it is unusable."""
    try:
        return decode(path.read_bytes(), limits)
    except BadImage as err:
        return str(err)
    except OSError as err:
        return unreadable(err)


def write_csv(predictions: list[Prediction], path: Path) -> None:
    """One row per (image, rank): path, rank (1 = most probable), class, probability, and an empty
    problem; an unusable file gets one row with only its path and its problem."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rank", "class", "probability", "problem"])
        for p in predictions:
            if p.problem is not None:
                writer.writerow([str(p.path), "", "", "", p.problem])
            for rank, (name, prob) in enumerate(p.top, 1):
                writer.writerow([str(p.path), rank, name, f"{prob:.6f}", ""])
