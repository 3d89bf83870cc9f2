"""The train/validation split: stratified, seeded, duplicate-aware, made once and written down by image id."""

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
        """Write the split as sorted image ids, so any run (or another tool) can reproduce it exactly; the
        file does not depend on the order in which a layout listed the images."""
        record = {**meta, "train": sorted(images.ids[i] for i in self.train),
                  "val": sorted(images.ids[i] for i in self.val)}
        path.write_text(json.dumps(record, indent=1) + "\n")

    def straddling(self, groups: np.ndarray) -> np.ndarray:
        """The groups that have members on both sides."""
        return np.intersect1d(groups[self.train], groups[self.val])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int, groups: np.ndarray | None = None) -> Split:
    """Hold out round(n_c * val_fraction) images of every class c, chosen by `seed`, whole groups at a time.

    Images that share a value in `groups` (duplicates) always land on the same side. Groups are
    visited in a seeded random order and a group joins validation while it fits every class's quota,
    so with single images the quotas are met exactly, and a group goes to validation about as often
    as a single image does. The result depends only on the labels, groups and seed, not on anything else.
    """
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    classes, label_of = np.unique(labels, return_inverse=True)
    quota = np.rint(np.bincount(label_of, minlength=len(classes)) * val_fraction).astype(np.int64)
    group_ids, group_of = np.unique(groups, return_inverse=True)
    # counts[g, c]: images of class c in group g
    counts = np.zeros((len(group_ids), len(classes)), dtype=np.int64)
    np.add.at(counts, (group_of, label_of), 1)

    taken = np.zeros(len(classes), dtype=np.int64)
    in_val = np.zeros(len(group_ids), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(group_ids)):
        if np.all(taken + counts[g] <= quota):
            taken += counts[g]
            in_val[g] = True
    val_mask = in_val[group_of]
    return Split(train=np.flatnonzero(~val_mask), val=np.flatnonzero(val_mask))


def load_split(path: Path, images: ImageSet) -> Split:
    """Read a split file: JSON with "train" and "val" lists naming images by id (as `Split.save` writes) or
    by name (a file path as the layout lists it). Every entry must name exactly one image of `images`."""
    try:
        record = json.loads(Path(path).read_text())
        train, val = record["train"], record["val"]
    except FileNotFoundError:
        raise UserError(f"split file {path} not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"split file {path}: not a JSON object with 'train' and 'val' lists ({err})") from None
    where = {image_id: i for i, image_id in enumerate(images.ids)}
    if images.names is not None:
        seen: dict[str, int] = {}
        for i, name in enumerate(images.names):
            seen[name] = -1 if name in seen else i  # -1: two images share the name, so it names neither
        where.update({name: i for name, i in seen.items() if i >= 0 and name not in where})
    missing = [k for k in [*train, *val] if k not in where]
    if missing:
        raise UserError(f"{path}: {len(missing)} image ids are not in the dataset, e.g. {missing[:3]} "
                        "(unusable images are listed in a run's bad_files.csv)")
    train_idx, val_idx = (np.array(sorted({where[k] for k in keys}), dtype=np.int64) for keys in (train, val))
    both = np.intersect1d(train_idx, val_idx)
    if len(both):
        raise UserError(f"{path}: {len(both)} images are in both train and val, e.g. {images.ids[both[0]]}")
    return Split(train=train_idx, val=val_idx)
