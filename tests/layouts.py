"""Small image datasets written in every layout vlfit reads, with planted duplicates and faults.

Each builder writes the same encoded bytes, so the layouts hold byte-identical images.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["clapping", "running", "sitting"]


@dataclass
class Item:
    filename: str
    label: str | None
    data: bytes


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def picture(label: str, k: int, size: int = 32) -> Image.Image:
    """A learnable picture: the class sets the dominant colour, `k` the noise. Labels beyond CLASSES get
    noise of their own, so no two (label, k) share a picture."""
    c = CLASSES.index(label) if label in CLASSES else zlib.crc32(label.encode())
    pixels = np.random.default_rng([c, k]).integers(0, 128, (size, size, 3))
    pixels[:, :, c % 3] += 100
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def clean_items(per_class: int = 10, size: int = 32, classes: list[str] = CLASSES) -> list[Item]:
    """`per_class` distinct JPEGs of each class, named Image_<n>.jpg as in the Kaggle download."""
    items, n = [], 0
    for k in range(per_class):
        for label in classes:
            n += 1
            items.append(Item(f"Image_{n}.jpg", label, encode(picture(label, k, size), quality=90)))
    return items


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- layouts


def write_hub_parquet(root: Path, splits: dict[str, list[Item]], classes: list[str] = CLASSES) -> Path:
    """The hub repo layout: data/<split>-00000-of-00001.parquet with `image` {bytes, path} and `labels` ClassLabel."""
    for split, items in splits.items():
        hub_dataset(items, classes).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_disk(root: Path, splits: dict[str, list[Item]], classes: list[str] = CLASSES) -> Path:
    from datasets import DatasetDict

    DatasetDict({split: hub_dataset(items, classes) for split, items in splits.items()}).save_to_disk(str(root))
    return root


def hub_dataset(items: list[Item], classes: list[str]):
    from datasets import ClassLabel, Dataset
    from datasets import Image as ImageFeature

    ds = Dataset.from_dict({"image": [{"bytes": it.data, "path": it.filename} for it in items],
                            "labels": [classes.index(it.label) if it.label in classes else 0 for it in items]})
    return ds.cast_column("image", ImageFeature()).cast_column("labels", ClassLabel(names=classes))


def write_kaggle(root: Path, train: list[Item], test: list[Item] = ()) -> Path:
    """Human Action Recognition/{Training_set.csv, Testing_set.csv, train/, test/} as the Kaggle zip unpacks."""
    har = root / "Human Action Recognition"
    for folder, items in (("train", train), ("test", test)):
        (har / folder).mkdir(parents=True)
        for it in items:
            (har / folder / it.filename).write_bytes(it.data)
    _write_rows(har / "Training_set.csv", ["filename", "label"], [[it.filename, it.label] for it in train])
    _write_rows(har / "Testing_set.csv", ["filename"], [[it.filename] for it in test])
    return root


def write_imagefolder(root: Path, items: list[Item]) -> Path:
    for it in items:
        (root / it.label).mkdir(parents=True, exist_ok=True)
        (root / it.label / it.filename).write_bytes(it.data)
    return root


def write_csv(root: Path, items: list[Item]) -> Path:
    (root / "images").mkdir(parents=True)
    for it in items:
        (root / "images" / it.filename).write_bytes(it.data)
    manifest = root / "labels.csv"
    _write_rows(manifest, ["path", "label"], [[f"images/{it.filename}", it.label] for it in items])
    return manifest


def _write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------- planted faults

# file name -> a phrase its reason in bad_files.csv must contain
BROKEN = {
    "truncated.jpg": "truncated", "cut_short.png": "truncated",
    "garbage.jpg": "not an image", "notes.jpg": "not an image",
    "empty.jpg": "empty file", "tiny.png": "too small", "bomb.png": "too large", "huge.png": "too large",
}
# file name -> stored mode of an image that must be converted, not skipped
CONVERTIBLE = {"grey.png": "L", "grey16.png": "I;16", "cmyk.jpg": "CMYK", "palette.png": "P",
               "alpha.png": "RGBA", "rotated.jpg": "RGB"}


def broken_items(label: str = "running") -> list[Item]:
    """One file of every kind that cannot be used, each named as in BROKEN."""
    good = encode(picture(label, 99))
    data = {
        "truncated.jpg": good[: len(good) // 2],
        "cut_short.png": encode(picture(label, 97), "PNG")[:-200],  # header intact, pixel data cut
        "garbage.jpg": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "notes.jpg": b"these are my notes, not a picture\n",
        "empty.jpg": b"",
        "tiny.png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "bomb.png": png_header_only(20_000, 20_000),  # over Pillow's own hard limit
        "huge.png": png_header_only(10_000, 10_000),  # over data.max_image_pixels only
    }
    return [Item(name, label, blob) for name, blob in data.items()]


def convertible_items(label: str = "sitting") -> list[Item]:
    """One image in every stored form vlfit must turn into RGB, each named as in CONVERTIBLE."""
    base = picture(label, 98, size=40)
    pal_alpha = base.convert("RGBA")
    pal_alpha.putalpha(Image.new("L", base.size, 0).point(lambda _: 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide = base.resize((48, 24))
    return [
        Item("grey.png", label, encode(base.convert("L"), "PNG")),
        Item("grey16.png", label, encode(Image.fromarray(
            (np.asarray(base.convert("L"), dtype=np.uint16) * 257)), "PNG")),
        Item("cmyk.jpg", label, encode(base.convert("CMYK"), "JPEG")),
        Item("palette.png", label, encode(base.convert("P"), "PNG")),
        Item("alpha.png", label, encode(pal_alpha, "PNG")),
        Item("rotated.jpg", label, encode(wide, "JPEG", exif=exif.tobytes())),
    ]


def duplicate_items(items: list[Item]) -> list[Item]:
    """Copies of `items[0]` (same bytes; same pixels as PNG) and near copies of `items[1]` (re-encoded, resized)."""
    first, second = items[0], items[1]
    pixels = Image.open(io.BytesIO(first.data)).convert("RGB")
    near = Image.open(io.BytesIO(second.data)).convert("RGB")
    return [
        Item("copy_of_first.jpg", first.label, first.data),
        Item("first_as.png", first.label, encode(pixels, "PNG")),
        Item("second_q60.jpg", second.label, encode(near, "JPEG", quality=60)),
        Item("second_big.jpg", second.label, encode(near.resize((40, 40)), "JPEG", quality=90)),
    ]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """`datasets` caches what it loads; keep that cache inside the test's temporary directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # for `vlfit` subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()
