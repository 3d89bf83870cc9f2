"""The layouts a dataset arrives in, read into one list of entries: where each image is, its label, its id.

Reading a catalog opens no image. Every layout gives the same entries for the same files: the
id of an image is a hash of its bytes, so one dataset delivered as a hub/parquet copy, a Kaggle
download, an image folder or a CSV manifest yields the same ids, classes and split.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlfit.config import DataConfig
from vlfit.data.images import unreadable
from vlfit.errors import UserError, first_line

KAGGLE_FILES = {"train": ("Training_set.csv", "train"), "test": ("Testing_set.csv", "test")}


@dataclass
class Entry:
    """One image as the layout lists it."""

    name: str  # where it is, for people: a path relative to data.path, or split[row] for tables
    split: str  # the source split it belongs to
    label: str | None  # the label's name as stored; None when the row has none
    key: Any  # what the catalog's blob store reads the image with
    problem: str | None = None  # why it is unusable before anything is decoded
    id: str | None = None  # stable identity, filled in by `Catalog.identify`


@dataclass
class Catalog:
    """All entries of the splits a run uses, the class names in label order, and a way to read each image."""

    entries: list[Entry]
    classes: list[str]
    blobs: Blobs
    unlabelled: set[str] = field(default_factory=set)  # splits that carry no labels at all
    declared: bool = False  # classes fixed by the source or data.classes, not read off the labels found

    def label_index(self) -> np.ndarray:
        """Each entry's class index, -1 where it has none; entries with an unknown label get a problem."""
        index = {name: i for i, name in enumerate(self.classes)}
        labels = np.full(len(self.entries), -1, dtype=np.int64)
        for i, e in enumerate(self.entries):
            if e.problem is not None or e.split in self.unlabelled:
                continue
            if e.label is None or e.label == "":
                e.problem = "no label"
            elif e.label not in index:
                e.problem = f"unknown label {e.label!r} (not one of the {len(self.classes)} classes)"
            else:
                labels[i] = index[e.label]
        return labels

    def identify(self) -> None:
        """Give every readable entry an id: the first 16 hex digits of the SHA-256 of its bytes.

        Copies of one file share a hash; they are told apart by a suffix (~2, ~3) given in the order of
        (split, label), which every layout sees the same way, so the ids stay layout-independent.
        """
        for e in self.entries:
            if e.problem is not None or e.id is not None:
                continue
            try:
                data = self.blobs.read(e.key)
            except OSError as err:
                e.problem = unreadable(err)
                continue
            e.id = hashlib.sha256(data).hexdigest()[:16]
        by_id: dict[str, list[Entry]] = {}
        for e in self.entries:
            if e.id is not None:
                by_id.setdefault(e.id, []).append(e)
        for copies in by_id.values():
            copies.sort(key=lambda e: (e.split, e.label or ""))
            for n, e in enumerate(copies[1:], start=2):
                e.id = f"{e.id}~{n}"


class Blobs:
    """Reads the stored form of one image: encoded bytes, or an RGB array for generated data."""

    def read(self, key: Any) -> bytes | np.ndarray:
        raise NotImplementedError


class FileBlobs(Blobs):
    def read(self, key: Path) -> bytes:
        return Path(key).read_bytes()


class ArrayBlobs(Blobs):
    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = arrays

    def read(self, key: int) -> np.ndarray:
        return self.arrays[key]


class TableBlobs(Blobs):
    """Images in an Arrow table of the hub's schema (`{bytes, path}` structs), read without decoding."""

    def __init__(self, tables: dict[str, Any], column: str):
        # Arrow format hands back the stored struct as it is; datasets would otherwise decode it with PIL.
        self.tables = {split: t.with_format("arrow") for split, t in tables.items()}
        self.column = column

    def read(self, key: tuple[str, int]) -> bytes:
        split, row = key
        cell = self.tables[split][row][self.column][0].as_py()
        if isinstance(cell, bytes):
            return cell
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):  # not embedded: the table points at a file
            return Path(cell["path"]).read_bytes()
        raise OSError(f"row {row} of split {split} holds no image")


# ----------------------------------------------------------------------------- layouts


def read_catalog(cfg: DataConfig) -> Catalog:
    """The entries of `cfg.train_split` (and `cfg.val_split`) in the layout `cfg.source` names."""
    splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split else [])
    reader = {"synthetic-har": _synthetic, "hub": _table, "parquet": _table, "disk": _table,
              "kaggle": _kaggle, "imagefolder": _imagefolder, "csv": _manifest}[cfg.source]
    catalog = reader(cfg, splits)
    if cfg.classes is not None:
        catalog.classes, catalog.declared = list(cfg.classes), True
    for split in splits:  # a label column left empty is no labels, not a column of bad rows
        if not any(e.label for e in catalog.entries if e.split == split):
            catalog.unlabelled.add(split)
    return catalog


def _synthetic(cfg: DataConfig, splits: list[str]) -> Catalog:
    from vlfit.data.synthetic import HAR_CLASSES, make_synthetic_har

    if splits != ["train"]:
        raise UserError(f"data.train_split: synthetic-har has one split, 'train' (got {cfg.train_split!r})")
    images, labels = make_synthetic_har(cfg.num_images, cfg.image_size, cfg.seed)
    entries = []
    for i, label in enumerate(labels):
        image_id = f"synthetic-har/{cfg.seed}/{cfg.image_size}/{i:06d}"
        entries.append(Entry(image_id, "train", HAR_CLASSES[label], i, id=image_id))
    return Catalog(entries, list(HAR_CLASSES), ArrayBlobs(images), declared=True)


def _table(cfg: DataConfig, splits: list[str]) -> Catalog:
    """Hub id, parquet files or a save_to_disk folder, all read through `datasets`."""
    import datasets

    dataset = _load_datasets(cfg)
    _require_splits(cfg, list(dataset), cfg.location)
    features = dataset[cfg.train_split].features
    image_cols = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    image_col = cfg.image_column or (image_cols[0] if len(image_cols) == 1 else "image")
    if image_col not in features:
        raise UserError(f"data.image_column: no column {image_col!r} in {cfg.location} "
                        f"(columns: {', '.join(features)})")
    label_col = cfg.label_column or _label_column(features, cfg)

    entries: list[Entry] = []
    unlabelled: set[str] = set()
    hint: list[str] | None = None
    for split in splits:
        table = dataset[split]
        feature = table.features.get(label_col)
        if feature is None:
            unlabelled.add(split)
            names = [None] * len(table)
        else:
            names = _label_names(table[label_col], feature)
            if split == cfg.train_split and hasattr(feature, "names"):
                hint = list(feature.names)
        paths = _stored_paths(table, image_col)
        for row, (label, path) in enumerate(zip(names, paths)):
            entries.append(Entry(path or f"{split}[{row}]", split, label, (split, row)))
    classes = hint or _sorted_names(e.label for e in entries if e.split == cfg.train_split)
    tables = {split: dataset[split].select_columns([image_col]) for split in splits}
    return Catalog(entries, classes, TableBlobs(tables, image_col), unlabelled, declared=hint is not None)


def _load_datasets(cfg: DataConfig) -> dict[str, Any]:
    import datasets

    where = cfg.location
    try:
        with _quiet_datasets():
            if cfg.source == "disk":
                loaded = datasets.load_from_disk(where)
            elif cfg.source == "parquet" and Path(where).is_dir():
                loaded = datasets.load_dataset("parquet", data_dir=where)
            elif cfg.source == "parquet":
                loaded = datasets.load_dataset("parquet", data_files=where)
            else:
                loaded = datasets.load_dataset(where, revision=cfg.revision)
    except Exception as err:  # `datasets` raises many types for a wrong path, a missing repo, or no network
        hint = (" If this machine is offline, download the dataset elsewhere and use data.source: parquet or disk."
                if cfg.source == "hub" else "")
        raise UserError(f"data.path: cannot load {cfg.source} dataset {where!r}: {first_line(err)}.{hint}") from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


@contextmanager
def _quiet_datasets():
    """No progress bars from `datasets` while it loads: they would break up the console output."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _label_column(features: dict[str, Any], cfg: DataConfig) -> str:
    import datasets

    class_labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    named = [c for c in ("labels", "label") if c in features]
    if len(class_labels) > 1 or not named:
        raise UserError(f"data.label_column: cannot tell which column of {cfg.location} holds the labels "
                        f"(columns: {', '.join(features)}); name it")
    return named[0]


def _label_names(values: Sequence[Any], feature: Any) -> list[str | None]:
    """Label names of a column: ClassLabel indices through its names (-1 is datasets' 'no label')."""
    names = getattr(feature, "names", None)
    out: list[str | None] = []
    for v in values:
        if v is None or (names is not None and v == -1):
            out.append(None)
        elif names is not None:
            out.append(names[v] if 0 <= v < len(names) else f"#{v}")
        else:
            out.append(str(v))
    return out


def _stored_paths(table: Any, column: str) -> list[str | None]:
    """The file names a hub-schema image column records, read from Arrow without touching the bytes."""
    try:  # field() of each chunk is a view: the image bytes are not copied
        return [p for chunk in table.data.column(column).chunks for p in chunk.field("path").to_pylist()]
    except (AttributeError, KeyError, ValueError):  # not a struct column: no names stored
        return [None] * len(table)


def _kaggle(cfg: DataConfig, splits: list[str]) -> Catalog:
    """The Kaggle HAR download: `Training_set.csv` (filename,label) next to a flat `train/` folder."""
    root = Path(cfg.location)
    if not (root / "Training_set.csv").is_file():
        inner = [d for d in root.iterdir() if (d / "Training_set.csv").is_file()] if root.is_dir() else []
        if len(inner) != 1:
            raise UserError(f"data.path: {root} holds no Training_set.csv (the Kaggle HAR layout)")
        root = inner[0]  # the zip unpacks to one folder, "Human Action Recognition"
    _require_splits(cfg, list(KAGGLE_FILES), str(root))
    entries: list[Entry] = []
    unlabelled: set[str] = set()
    for split in splits:
        listing, folder = KAGGLE_FILES[split]
        rows, columns = _read_csv(root / listing, required=("filename",))
        if "label" not in columns:
            unlabelled.add(split)
        for n, row in enumerate(rows, start=2):  # line 1 is the header
            entries.append(_file_entry(root / folder, row.get("filename"), split, row.get("label"),
                                       f"{listing} line {n}"))
    classes = _sorted_names(e.label for e in entries if e.split == cfg.train_split)
    return Catalog(entries, classes, FileBlobs(), unlabelled)


def _manifest(cfg: DataConfig, splits: list[str]) -> Catalog:
    """A CSV of `path,label` rows (paths relative to the CSV), with an optional `split` column."""
    manifest = Path(cfg.location)
    rows, columns = _read_csv(manifest, required=("path", "label"))
    # Without a split column every row belongs to the training split.
    row_split = [(r.get("split") or "").strip() or cfg.train_split for r in rows]
    _require_splits(cfg, sorted(set(row_split)), str(manifest))
    entries = [_file_entry(manifest.parent, row.get("path"), split, row.get("label"), f"{manifest.name} line {n}")
               for n, (row, split) in enumerate(zip(rows, row_split), start=2) if split in splits]
    classes = _sorted_names(e.label for e in entries if e.split == cfg.train_split)
    return Catalog(entries, classes, FileBlobs())


def _imagefolder(cfg: DataConfig, splits: list[str]) -> Catalog:
    """One sub-folder per class, as torchvision's ImageFolder reads it; `root/<split>/<class>/` when there are
    split folders."""
    root = Path(cfg.location)
    if not root.is_dir():
        raise UserError(f"data.path: {root} is not a folder")
    entries = []
    for split in splits:
        split_root = root / split
        if not split_root.is_dir():
            if split != cfg.train_split:
                raise UserError(f"data.val_split: no folder {split_root}")
            split_root = root
        for class_dir in sorted(d for d in split_root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not _hidden(p, class_dir)):
                entries.append(Entry(path.relative_to(root).as_posix(), split, class_dir.name, path))
    classes = _sorted_names(e.label for e in entries if e.split == cfg.train_split)
    if not classes:
        raise UserError(f"data.path: {root} has no class folders with files in them")
    return Catalog(entries, classes, FileBlobs())


# ----------------------------------------------------------------------------- helpers


def _file_entry(folder: Path, name: str | None, split: str, label: str | None, where: str) -> Entry:
    if not name:
        return Entry(where, split, label, None, problem="row names no file")
    name = name.strip()
    path = folder / name
    label = label.strip() if label is not None else None
    return Entry(name, split, label, path, None if path.is_file() else "file not found")


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        raise UserError(f"data.path: {path} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"data.path: {path} is not a UTF-8 CSV file ({first_line(err)})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(columns) or "none"
        raise UserError(f"data.path: {path} needs columns {', '.join(required)} (found: {found})")
    if not rows:
        raise UserError(f"data.path: {path} has a header but no rows")
    return rows, columns


def _require_splits(cfg: DataConfig, available: list[str], where: str) -> None:
    for key in ("train_split", "val_split"):
        split = getattr(cfg, key)
        if split is not None and split not in available:
            raise UserError(f"data.{key}: no split {split!r} in {where} (it has: {', '.join(available)})")


def _sorted_names(labels) -> list[str]:
    """Label names in a stable order: numbers by value, then text alphabetically."""
    names = {label for label in labels if label}
    return sorted(names, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def _hidden(path: Path, under: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(under).parts)
