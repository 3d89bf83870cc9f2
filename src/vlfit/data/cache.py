"""A cache of decoded images: each image decoded once, then read from a memory-mapped file.

An entry holds every image of an `ImageSet` as uint8 CHW pixels at its own aspect ratio, one after
another in one flat file, with an index of where each starts, the size it is stored at and the size
of the original. An image is stored as it is unless it is larger than the model can use: then it is
shrunk once (antialiased, aspect kept) so its shorter side is `limit` (by default twice what the
smallest training crop needs) and its longer side at most twice that. Crops and resizes are then computed from these pixels
in one resampling (`vlfit.data.resample`), as the model's own image processor computes them from the
original: what training and evaluation see is what a deployment sees.

An entry is keyed by the set's image ids, the limit and the resampling filter, so a change to any of
them builds a new entry, and the same data is decoded once for every epoch and every later run. The
key trusts the ids: a source must give an image a new id when its content changes.

An entry is built in a scratch directory and renamed into place only when complete; an interrupted
build (Ctrl-C, a crash, a kill) leaves no entry behind, and its scratch directory is removed by the
next build once the process that made it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from vlfit.data.sources import ImageSet
from vlfit.data.transforms import INTERPOLATION
from vlfit.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: every image squashed to one square side
PIXELS, INDEX, META = "pixels.u8", "index.npy", "meta.json"  # pixels: raw bytes, see ImageCache
# index columns: where the image's pixels start in the flat file, its stored (h, w), its original (h, w)
OFFSET, STORED, ORIGINAL = 0, slice(1, 3), slice(3, 5)
# Worker processes cost more to start than a few hundred small images take to decode.
_MIN_IMAGES_PER_WORKER = 256


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlfit, else ~/.cache/vlfit."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlfit"


def size_limit(input_size: int, min_crop_scale: float = 1.0, cache_size: int | None = None) -> int:
    """The largest shorter side stored: `cache_size`, or twice the input side over the side of the smallest
    crop (sqrt of `min_crop_scale`, the smallest crop area as a share of the image).

    Twice, because a resample that shrinks by 2x or more from a shrunk copy agrees with one from the
    original to 50 dB or better, while one that shrinks by 1.25x is at 40 dB and visibly softer
    (BENCHMARKS.md); smaller images are kept exactly.
    """
    return cache_size or math.ceil(2 * input_size / math.sqrt(min_crop_scale))


def stored_size(height: int, width: int, limit: int) -> tuple[int, int]:
    """(h, w) an image of `height` x `width` is kept at: unchanged while its shorter side is at most `limit`
    and its longer side at most `2 * limit`, else shrunk, aspect kept, to fit both."""
    r = min(1.0, limit / min(height, width), 2 * limit / max(height, width))
    return (height, width) if r == 1.0 else (max(1, round(height * r)), max(1, round(width * r)))


def fit(image: np.ndarray, limit: int, interpolation: str = "bicubic") -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, h, w) at `stored_size`: what the cache keeps of an image, and what
    the in-memory evaluation path uses in its place."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    size = stored_size(image.shape[0], image.shape[1], limit)
    if size != image.shape[:2]:
        chw = TF.resize(chw, list(size), interpolation=INTERPOLATION[interpolation], antialias=True)
    return chw.contiguous()


def cache_key(ids: Sequence[str], limit: int, interpolation: str) -> str:
    """A name for the entry holding exactly these images, in this order, at this limit and filter."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, limit, interpolation, len(ids)]).encode())
    for image_id in ids:
        h.update(image_id.encode())
        h.update(b"\0")
    return f"{limit}px-{len(ids)}-{h.hexdigest()[:16]}"


class ImageCache:
    """A complete cache entry: `pixels`, one flat memory-mapped uint8 array, and `index` (N, 5) int64
    (offset, stored h, stored w, original h, original w) per image."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / META).read_text())
        self.index = np.load(path / INDEX)
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        # Opened lazily, so each DataLoader worker maps the file itself instead of receiving a pickled copy.
        if self._pixels is None:  # (a raw file: its length is known only once every image is written)
            empty = (self.path / PIXELS).stat().st_size == 0  # which np.memmap cannot map
            self._pixels = np.zeros(0, np.uint8) if empty else np.memmap(self.path / PIXELS, np.uint8, mode="r")
        return self._pixels

    @property
    def limit(self) -> int:
        return self.meta["limit"]

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) original (h, w)."""
        return self.index[:, ORIGINAL]

    def image(self, i: int) -> np.ndarray:
        """Image i as stored: uint8 (3, h, w), read from the memory map."""
        offset, (h, w) = self.index[i, OFFSET], self.index[i, STORED]
        return np.asarray(self.pixels[offset:offset + 3 * h * w]).reshape(3, h, w)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}


def open_cache(images: ImageSet, limit: int, interpolation: str = "bicubic", root: Path | None = None,
               workers: int | None = None, show: bool = True) -> ImageCache:
    """The cache entry for `images` with shorter sides up to `limit` (see `stored_size`), built first
    (decoding every image once) if there is none.

    `workers`: decoding processes (None: one per available core). Raises UserError when the cache
    directory cannot be written or the disk is too small.
    """
    root = Path(root) if root is not None else default_cache_dir()
    path = root / "images" / cache_key(images.ids, limit, interpolation)
    if (path / META).is_file():
        log.info("image cache hit: %s", path)
        return ImageCache(path)
    _remove_abandoned_builds(path)
    scratch = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _writing(root):
            scratch.mkdir(parents=True)
        start = time.perf_counter()
        stored = _build(images, limit, interpolation, scratch, workers, show, root)
        with _writing(root):
            (scratch / META).write_text(json.dumps({
                "version": FORMAT_VERSION, "limit": limit, "interpolation": interpolation, "count": len(images),
                "bytes": stored, "first_id": images.ids[0] if len(images) else None,
                "build_seconds": time.perf_counter() - start, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                indent=1))
            for name in (PIXELS, INDEX, META):
                _fsync(scratch / name)
            try:
                scratch.rename(path)
            except OSError:
                if not (path / META).is_file():
                    raise
                # Another process finished the same entry first; its copy is as good as ours.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a no-op after a successful rename
    log.info("image cache built: %s (%d images, %.2f GiB)", path, len(images), stored / 2**30)
    return ImageCache(path)


class _Fitted(Dataset):
    """image i -> (uint8 (3, h, w) as `fit` stores it, its original (h, w))."""

    def __init__(self, images: Sequence[np.ndarray], limit: int, interpolation: str):
        self.images, self.limit, self.interpolation = images, limit, interpolation

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        image = np.asarray(self.images[i])
        try:
            return fit(image, self.limit, self.interpolation), image.shape[:2]
        except UserError as err:
            raise UserError(f"image {i}: {err}") from None


def _build(images: ImageSet, limit: int, interpolation: str, out: Path, workers: int | None, show: bool,
           root: Path) -> int:
    """Decode and fit every image into out/pixels.u8 (written in order, no memory map: a full disk is an
    ordinary error, not a crash) and out/index.npy; returns the bytes of pixels stored."""
    n = len(images)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, n // _MIN_IMAGES_PER_WORKER)
    # Its own generator: iterating a loader draws a seed, and a draw from the global stream would make
    # the run that builds the cache train differently from the runs that find it.
    loader = DataLoader(_Fitted(images.images, limit, interpolation), batch_size=32, num_workers=workers,
                        collate_fn=list, generator=torch.Generator())
    index = np.zeros((n, 5), dtype=np.int64)
    done = offset = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), disable=not show)
    with _writing(root):
        f = (out / PIXELS).open("wb")
    with progress, f:
        task = progress.add_task(f"decoding images into the cache ({max(workers, 1)} processes)", total=n)
        for batch in loader:
            for pixels, hw in batch:
                with _writing(root):
                    f.write(pixels.numpy().tobytes())
                index[done] = (offset, *pixels.shape[1:], *hw)
                offset += pixels.numel()
                done += 1
            if done == len(batch):  # the first images say about how large the whole entry will be
                _check_space(root, offset * n / done - offset)
            progress.advance(task, len(batch))
    with _writing(root):
        np.save(out / INDEX, index)
    return offset


@contextmanager
def _writing(root: Path) -> Iterator[None]:
    """Turn a failure to write the cache (permissions, a full disk) into one clear message."""
    try:
        yield
    except OSError as err:
        raise UserError(f"data.cache_dir: cannot write the image cache under {root}: {err.strerror or err}; "
                        "set data.cache_dir to a writable directory or use data.pipeline: torchvision") from None


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise UserError(f"data.cache_dir: the image cache needs {needed / 2**30:.2f} GiB but {root} has "
                        f"{free / 2**30:.2f} GiB free; set data.cache_dir elsewhere, a smaller data.cache_size, "
                        "or data.pipeline: torchvision")


def _remove_abandoned_builds(path: Path) -> None:
    """Delete scratch directories of builds of `path` whose process no longer runs."""
    for scratch in path.parent.glob(f"{path.name}.partial-*"):
        try:
            pid = int(scratch.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(scratch, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours to judge: a foreign name, or a live process of another user


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
