"""The train/validation split: stratified, seeded, made once and written down by image identity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlfit.data.sources import ImageSet
from vlfit.errors import UserError


@dataclass
class Split:
    train: np.ndarray  # indices into the ImageSet, ascending
    val: np.ndarray

    def save(self, path: Path, images: ImageSet, **meta) -> None:
        """Write the split as image ids, so any run (or another tool) can reproduce it exactly."""
        record = {**meta, "train": [images.ids[i] for i in self.train], "val": [images.ids[i] for i in self.val]}
        path.write_text(json.dumps(record, indent=1))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Split:
    """Hold out round(n_c * val_fraction) images of every class c, chosen by `seed`.

    The choice for one class does not depend on the others, so adding a class leaves the rest of
    the split unchanged.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(len(members) * val_fraction))
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return Split(train=train_idx, val=val_idx)


def load_split(path: Path, images: ImageSet) -> Split:
    """Read a split written by `Split.save`; every id in it must name an image of `images`."""
    record = json.loads(path.read_text())
    where = {image_id: i for i, image_id in enumerate(images.ids)}
    missing = [i for i in record["train"] + record["val"] if i not in where]
    if missing:
        raise UserError(f"{path}: {len(missing)} image ids are not in the dataset, e.g. {missing[:3]}")
    return Split(train=np.array(sorted(where[i] for i in record["train"]), dtype=np.int64),
                 val=np.array(sorted(where[i] for i in record["val"]), dtype=np.int64))
