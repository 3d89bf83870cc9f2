"""From a data config to checked images and a fixed split: the one entry point a run uses.

`prepare_data` reads the dataset's catalog, decodes every image once (in parallel with
`data.num_workers`), sets aside what cannot be used, groups duplicates, refuses data it cannot
evaluate honestly, and writes down what it did in the run directory:

    classes.txt       class names in label order
    split.json        the train/validation split as image ids
    bad_files.csv     every skipped file or row, with the reason
    duplicates.json   every group of exact or near duplicates, and what was dropped
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vlfit.config import DataConfig
from vlfit.data.catalog import Catalog, Entry, read_catalog
from vlfit.data.duplicates import DuplicateGroup, find_duplicates
from vlfit.data.images import ImageFacts, Limits, examine, unreadable
from vlfit.data.sources import ImageSet, image_set
from vlfit.data.split import Split, load_split, stratified_split
from vlfit.errors import UserError

log = logging.getLogger(__name__)

CLASSES, SPLIT, BAD_FILES, DUPLICATES = "classes.txt", "split.json", "bad_files.csv", "duplicates.json"
# Images handed to the decoding workers at a time: bounds the encoded bytes held in memory.
_BATCH = 1024
_SHOWN = 5  # small classes named in a message


def prepare_data(cfg: DataConfig, run_dir: Path | None) -> tuple[ImageSet, Split]:
    """The checked images of `cfg` and their train/validation split, with the data's records written to
    `run_dir` (None: not written, as by every process but the main one). Raises UserError, after
    writing the records, when the data cannot be used honestly. The same data gives the same result
    in every process."""
    survey = survey_data(cfg)
    if run_dir is not None:
        survey.write(run_dir)
        survey.log_summary(run_dir)
    refuse(survey.problems())
    return survey.fixed_split(run_dir)


def refuse(problems: list[str]) -> None:
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems with the data:\n" + "\n".join(f"  {p}" for p in problems))


def survey_data(cfg: DataConfig) -> Survey:
    """Read and check every image `cfg` names; nothing is written and nothing is refused yet."""
    catalog = read_catalog(cfg)
    labels = catalog.label_index()
    catalog.identify()
    entries = catalog.entries
    readable = [i for i, e in enumerate(entries) if e.problem is None]
    facts = dict(zip(readable, _examine_all(catalog, readable, Limits(cfg.min_image_size, cfg.max_image_pixels),
                                            cfg.num_workers)))
    for i, f in facts.items():
        entries[i].problem = f.reason
    # In id order, so duplicate groups, and with them the split, do not depend on the layout's order.
    usable = sorted((i for i in readable if entries[i].problem is None), key=lambda i: entries[i].id)
    group_at, found = find_duplicates([facts[i].pixel_digest for i in usable],
                                      np.array([facts[i].phash for i in usable], dtype=np.uint64),
                                      np.array([facts[i].dhash for i in usable], dtype=np.uint64),
                                      cfg.near_duplicate_distance)
    group_of = np.full(len(entries), -1, dtype=np.int64)
    group_of[usable] = group_at
    groups = [DuplicateGroup(g.kind, [usable[m] for m in g.members]) for g in found]
    survey = Survey(cfg, catalog, labels, facts, usable, group_of, groups, {})
    survey.dropped = survey.choose_dropped()
    return survey


@dataclass
class Survey:
    """What the load-time check found. Indices are into `catalog.entries`."""

    cfg: DataConfig
    catalog: Catalog
    labels: np.ndarray  # class index per entry, -1 where it has none
    facts: dict[int, ImageFacts]  # per decoded entry
    usable: list[int]  # decodable entries with a label or in an unlabelled split, in id order
    group_of: np.ndarray  # duplicate group per entry (-1: unusable); equal values stay on one side
    groups: list[DuplicateGroup]  # the groups of two or more
    dropped: dict[int, str]  # usable entries left out as duplicates, and why

    @property
    def entries(self) -> list[Entry]:
        return self.catalog.entries

    @property
    def bad(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.problem is not None]

    @property
    def kept(self) -> list[int]:
        return [i for i in self.usable if i not in self.dropped]

    def choose_dropped(self) -> dict[int, str]:
        """Training copies of anything in the validation split, and with exact_duplicates=drop all but the
        first copy (by id) of identical images; copies whose labels disagree are all dropped then."""
        cfg, dropped = self.cfg, {}
        if cfg.val_split is not None:
            for g in self.groups:
                if any(self.entries[m].split == cfg.val_split for m in g.members):
                    dropped.update({m: f"{g.kind} duplicate of a {cfg.val_split!r} image" for m in g.members
                                    if self.entries[m].split == cfg.train_split})
        if cfg.exact_duplicates == "drop":
            copies: dict[tuple[str, bytes], list[int]] = {}
            for i in self.usable:
                if i not in dropped:
                    copies.setdefault((self.entries[i].split, self.facts[i].pixel_digest), []).append(i)
            for same in (c for c in copies.values() if len(c) > 1):
                names = sorted({self.class_name(i) for i in same})
                if len(names) > 1:
                    dropped.update({i: f"identical images with conflicting labels ({', '.join(names)})" for i in same})
                else:
                    dropped.update({i: f"identical to {self.entries[same[0]].id}" for i in same[1:]})
        return dropped

    def class_name(self, i: int) -> str:
        return self.catalog.classes[self.labels[i]] if self.labels[i] >= 0 else ""

    # ------------------------------------------------------------------ decisions

    def problems(self) -> list[str]:
        """Why this data cannot be used for training with honest validation; empty when it can."""
        cfg, out = self.cfg, self.file_problems()
        if not self.entries:
            return out
        train = self._kept_labels(cfg.train_split)
        if cfg.train_split in self.catalog.unlabelled:
            out.append(f"data.train_split: {cfg.train_split!r} has no labels, so it cannot be trained on")
        elif len(np.unique(train)) < 2:
            out.append(f"data.train_split: {cfg.train_split!r} cannot be trained on: {self.label_problem(train)}")
        if cfg.val_split is not None and (why := self.evaluation_problem(cfg.val_split)):
            out.append(f"data.val_split: {cfg.val_split!r} cannot be used for evaluation: {why}; it can still be "
                       f"used for prediction. Leave data.val_split unset to hold out data.val_fraction of "
                       f"{cfg.train_split!r}")
        return out

    def file_problems(self) -> list[str]:
        """No images at all, or more unusable ones than data.strict and data.max_bad_fraction allow."""
        cfg, entries, bad = self.cfg, self.entries, self.bad
        if not entries:
            return [f"data.path: no images found in {cfg.location}"]
        out = []
        if bad and cfg.strict:
            e = entries[bad[0]]
            out.append(f"data.strict: {len(bad)} unusable images or rows, e.g. {e.name}: {e.problem}")
        if len(bad) / len(entries) > cfg.max_bad_fraction:
            out.append(f"data.max_bad_fraction: {len(bad)} of {len(entries)} images ({len(bad) / len(entries):.1%}) "
                       f"are unusable, more than the {cfg.max_bad_fraction:.1%} allowed")
        return out

    def evaluation_problem(self, split: str) -> str | None:
        """Why the kept images of `split` cannot score a classifier, or None."""
        if split in self.catalog.unlabelled:
            return "it has no labels"
        return self.label_problem(self._kept_labels(split))

    def label_problem(self, labels: np.ndarray) -> str | None:
        """Why these labels cannot train or score a classifier, or None."""
        classes = self.catalog.classes
        if len(labels) == 0:
            return "it has no usable images"
        if len(classes) == 1:
            return f"the data has only one class, {classes[0]!r}; a classifier needs at least two"
        values = np.unique(labels)
        if len(values) == 1:  # one label where the data has several classes
            c = int(values[0])
            return (f"all {len(labels)} labels are {classes[c]!r} (label {c}), which is how placeholder "
                    "labels look (the hub copy of HAR marks its unlabelled test split this way)")
        return None

    def _kept_labels(self, split: str) -> np.ndarray:
        return self.labels[[i for i in self.kept if self.entries[i].split == split]].astype(np.int64)

    def image_set(self) -> tuple[ImageSet, np.ndarray, np.ndarray]:
        """(the kept images in id order, each one's source split, each one's duplicate group)."""
        kept = self.kept
        images = image_set(self.catalog, kept, self.labels, self.cfg)
        origin = np.array([self.entries[i].split for i in kept], dtype=object)
        return images, origin, self.group_of[kept]

    def fixed_split(self, out_dir: Path | None) -> tuple[ImageSet, Split]:
        """The kept images and the run's split, which is written to `out_dir`/split.json (if not None)."""
        cfg = self.cfg
        images, origin, groups = self.image_set()
        split = self.split(images, origin, groups)
        if out_dir is None:
            return images, split
        split.save(out_dir / SPLIT, images, source=cfg.source, data_path=cfg.location, train_split=cfg.train_split,
                   val_split=cfg.val_split, val_fraction=None if cfg.val_split or cfg.split_file else cfg.val_fraction,
                   seed=cfg.split_seed, split_file=cfg.split_file, n_train=len(split.train), n_val=len(split.val))
        return images, split

    def split(self, images: ImageSet, origin: np.ndarray, groups: np.ndarray) -> Split:
        """The run's split: a user's split file, the named validation split, or a stratified hold-out; refused
        when it leaves a side empty or a class too small (`check_class_sizes`)."""
        cfg = self.cfg
        if cfg.split_file is not None:
            split = load_split(Path(cfg.split_file), images)
            leaks = split.straddling(groups)
            if len(leaks):
                example = [images.names[i] for i in np.flatnonzero(groups == leaks[0])]
                raise UserError(f"data.split_file: {len(leaks)} groups of duplicate images have copies in both train "
                                f"and val, e.g. {', '.join(example)}; a leak-free split keeps each group on one side")
        elif cfg.val_split is not None:
            split = Split(train=np.flatnonzero(origin == cfg.train_split), val=np.flatnonzero(origin == cfg.val_split))
        else:
            split = stratified_split(images.labels, cfg.val_fraction, cfg.split_seed, groups)
        if cfg.split_file is not None and (why := self.label_problem(images.labels[split.val])):
            raise UserError(f"data.split_file: its val images cannot be used for evaluation: {why}")
        if len(split.val) == 0 or len(split.train) == 0:
            raise UserError(f"the split leaves {len(split.train)} training and {len(split.val)} validation images; "
                            "a run needs both (too few images per class for data.val_fraction?)")
        self.check_class_sizes(images.labels, split)
        return split

    def check_class_sizes(self, labels: np.ndarray, split: Split) -> None:
        """Refuse classes with fewer than data.min_class_images images or none to validate on, when the
        classes were read off the labels found: there a mistyped label is a class of its own, and shifts
        the index of every class after it. Classes the source or data.classes declares, or
        data.allow_small_classes, only get a warning."""
        cfg, classes = self.cfg, self.catalog.classes
        train, val = (np.bincount(labels[side], minlength=len(classes)) for side in (split.train, split.val))
        small = [f"{name!r} ({train[c]} train, {val[c]} val)" for c, name in enumerate(classes)
                 if train[c] + val[c] < cfg.min_class_images or val[c] == 0]
        if not small:
            return
        what = (f"{len(small)} of {len(classes)} classes {'has' if len(small) == 1 else 'have'} fewer than "
                f"{cfg.min_class_images} images or none to validate on: {', '.join(small[:_SHOWN])}"
                + (f" and {len(small) - _SHOWN} more" if len(small) > _SHOWN else ""))
        if self.catalog.declared or cfg.allow_small_classes:
            log.warning("data: %s", what)
            return
        raise UserError(f"data.min_class_images: {what}. A mistyped label becomes a class of its own: list the "
                        "classes in data.classes (other labels are then skipped as bad rows), or set "
                        "data.allow_small_classes: true to train on them as they are")

    # ------------------------------------------------------------------ records

    def write(self, out_dir: Path) -> None:
        """classes.txt, bad_files.csv and duplicates.json in `out_dir`."""
        (out_dir / CLASSES).write_text("\n".join(self.catalog.classes) + "\n")
        with (out_dir / BAD_FILES).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "split", "reason"])
            writer.writerows([self.entries[i].name, self.entries[i].split, self.entries[i].problem] for i in self.bad)
        (out_dir / DUPLICATES).write_text(json.dumps(self.duplicates_record(), indent=1) + "\n")

    def duplicates_record(self) -> dict[str, Any]:
        kinds = Counter(g.kind for g in self.groups)
        return {
            "exact_groups": kinds["exact"], "near_groups": kinds["near"],
            "images_in_groups": sum(len(g.members) for g in self.groups), "dropped": len(self.dropped),
            "near_duplicate_distance": self.cfg.near_duplicate_distance,
            "groups": [{"kind": g.kind, "members": [self._member(m) for m in g.members]} for g in self.groups],
        }

    def _member(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        record = {"id": e.id, "name": e.name, "split": e.split, "label": self.class_name(i)}
        if i in self.dropped:
            record["dropped"] = self.dropped[i]
        return record

    def log_summary(self, run_dir: Path) -> None:
        cfg, kinds = self.cfg, Counter(g.kind for g in self.groups)
        log.info("data: %d usable images in %d classes from %s %s; %d exact and %d near duplicate groups "
                 "(%d images) kept on one side of the split, %d copies dropped", len(self.kept),
                 len(self.catalog.classes), cfg.source, cfg.location, kinds["exact"], kinds["near"],
                 sum(len(g.members) for g in self.groups), len(self.dropped))
        if self.bad:
            log.warning("skipped %d unusable images or rows of %d; each is listed with its reason in %s",
                        len(self.bad), len(self.entries), run_dir / BAD_FILES)

    def size_stats(self) -> dict[str, Any]:
        """Sizes and stored colour modes of the usable images."""
        facts = [self.facts[i] for i in self.usable]
        widths = np.array([f.width for f in facts]) if facts else np.zeros(1)
        heights = np.array([f.height for f in facts]) if facts else np.zeros(1)
        return {
            "width": (int(widths.min()), float(np.median(widths)), int(widths.max())),
            "height": (int(heights.min()), float(np.median(heights)), int(heights.max())),
            "modes": dict(Counter(f.mode for f in facts).most_common()),
            "rotated": sum(f.rotated for f in facts),
        }


def _examine_all(catalog: Catalog, index: list[int], limits: Limits, workers: int) -> list[ImageFacts]:
    """`examine` every listed entry, in worker processes when there are many; file reads stay here."""
    check = partial(_examine_read, limits=limits)
    parallel = workers > 1 and len(index) >= 256
    out: list[ImageFacts] = []
    with ProcessPoolExecutor(workers) if parallel else nullcontext() as pool:
        for start in range(0, len(index), _BATCH):
            blobs = [_read(catalog, catalog.entries[i]) for i in index[start:start + _BATCH]]
            out.extend(pool.map(check, blobs, chunksize=16) if parallel else map(check, blobs))
    return out


def _read(catalog: Catalog, entry: Entry) -> bytes | np.ndarray | OSError:
    try:
        return catalog.blobs.read(entry.key)
    except OSError as err:
        return err


def _examine_read(blob: bytes | np.ndarray | OSError, limits: Limits) -> ImageFacts:
    if isinstance(blob, OSError):
        return ImageFacts(reason=unreadable(blob))
    return examine(blob, limits)
