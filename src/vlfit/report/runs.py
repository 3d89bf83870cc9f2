"""Finished runs as the report sees them: read from their directories alone, no model loaded."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlfit.errors import UserError
from vlfit.evaluate import EVAL_FILE
from vlfit.metrics import MetricsLog

log = logging.getLogger(__name__)

MANIFEST = "compare.json"  # written by `vlfit compare` into its output folder: the runs in their order
MASK_EXAMPLES = "mask_examples.npz"  # optional: `images` (N, H, W, 3) uint8 and `keep` (N, h, w) bool
MASK_KEYS = ("kept_token_fraction", "saliency_time_s")  # metrics.jsonl keys that only masked runs write


@dataclass
class Run:
    """One finished run: its metrics per epoch, summary, resolved config and (when present) eval.json."""

    path: Path
    config: dict[str, Any]
    epochs: list[dict[str, Any]]
    summary: dict[str, Any]
    eval: dict[str, Any] | None
    train_images: int | None  # sizes of the split, from split.json
    val_images: int | None
    mask_examples: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.summary.get("name") or self.config.get("name") or self.path.name

    @property
    def best(self) -> dict[str, Any]:
        """The epoch with the highest val_acc; the earliest of equals, as training chose its best checkpoint."""
        return max(self.epochs, key=lambda r: r["val_acc"])

    def has(self, key: str) -> bool:
        return any(key in r for r in self.epochs)

    @property
    def masked(self) -> bool:
        return any(self.has(k) for k in MASK_KEYS)

    @property
    def unmasked_epochs(self) -> list[int]:
        """The epochs of a masked run that trained on every token (FLIP's unmasked final phase)."""
        return [r["epoch"] for r in self.epochs if r.get("masked") is False]


def load_run(path: Path) -> Run:
    """Read the run at `path`; a directory that is not a finished vlfit run is a UserError."""
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise UserError(f"{path} is not a vlfit run directory (no config.yaml and metrics.jsonl)")
    if not (path / "summary.json").is_file():
        raise UserError(f"{path} has not finished (no summary.json); finish it with `vlfit compare` or leave it out")
    epochs = MetricsLog.read(path / "metrics.jsonl")
    if not epochs:
        raise UserError(f"{path}/metrics.jsonl has no epochs")
    eval_path = path / EVAL_FILE
    split = json.loads((path / "split.json").read_text()) if (path / "split.json").is_file() else None
    examples = None
    if (path / MASK_EXAMPLES).is_file():
        with np.load(path / MASK_EXAMPLES, allow_pickle=False) as npz:
            examples = {k: npz[k] for k in npz.files}
    return Run(
        path=path,
        config=yaml.safe_load((path / "config.yaml").read_text()) or {},
        epochs=epochs,
        summary=json.loads((path / "summary.json").read_text()),
        eval=json.loads(eval_path.read_text()) if eval_path.is_file() else None,
        train_images=len(split["train"]) if split else None,
        val_images=len(split["val"]) if split else None,
        mask_examples=examples,
    )


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Runs named directly stay as given; a folder of runs (such as `vlfit compare`'s output)
    stands for its finished runs, in the order its compare.json lists them, then by name."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such directory")
        if (path / "config.yaml").is_file():
            runs.append(path)
            continue
        children = [c for c in sorted(path.iterdir()) if (c / "config.yaml").is_file() and (c / "metrics.jsonl").is_file()]
        if not children:
            raise UserError(f"{path} is neither a vlfit run nor a folder of runs")
        listed = json.loads((path / MANIFEST).read_text())["runs"] if (path / MANIFEST).is_file() else []
        order = {name: i for i, name in enumerate(listed)}
        children.sort(key=lambda c: (order.get(c.name, len(order)), c.name))
        for child in children:
            if (child / "summary.json").is_file():
                runs.append(child)
            else:
                log.warning("%s has not finished; leaving it out of the report", child)
    return runs


def write_mask_examples(run_dir: Path, images: np.ndarray, keep: np.ndarray, titles: list[str] | None = None) -> None:
    """Save a few validation images and their keep masks, for the report's overlay figure.

    `images`: (N, H, W, 3) uint8; `keep`: (N, h, w) bool over the patch grid (True: token kept).
    """
    arrays = {"images": np.asarray(images, dtype=np.uint8), "keep": np.asarray(keep, dtype=bool)}
    if titles is not None:
        arrays["titles"] = np.asarray(titles, dtype=str)
    np.savez_compressed(run_dir / MASK_EXAMPLES, **arrays)
