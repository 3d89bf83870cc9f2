"""A cache of decoded images: each image decoded and resized once, then read from a memory-mapped file.

An entry holds every image of an `ImageSet` squashed to `size` x `size` (uint8, CHW) plus its
original (height, width), so crops can still be drawn in the original image's coordinates
(`gpu_transforms`). It is keyed by the set's image ids, the side and the resampling filter, so a
change to any of them builds a new entry, and the same data at the same side is decoded once for
every epoch and every later run. The key trusts the ids: a source must give an image a new id when
its content changes.

An entry is built in a scratch directory and renamed into place only when complete; an interrupted
build (Ctrl-C, a crash, a kill) leaves no entry behind, and its scratch directory is removed by the
next build once the process that made it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vlfit.data.sources import ImageSet
from vlfit.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PIXELS, SIZES, META = "pixels.npy", "sizes.npy", "meta.json"
# Worker processes cost more to start than a few hundred small images take to decode.
_MIN_IMAGES_PER_WORKER = 256
_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlfit, else ~/.cache/vlfit."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlfit"


def cache_side(input_size: int, cache_size: int | None = None) -> int:
    """The stored side: `cache_size`, or 15% above the model's input so crops keep some detail to resample."""
    return cache_size or round(input_size * 1.15)


def cache_key(ids: Sequence[str], size: int, interpolation: str) -> str:
    """A name for the entry holding exactly these images, in this order, at this side and filter."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, size, interpolation, len(ids)]).encode())
    for image_id in ids:
        h.update(image_id.encode())
        h.update(b"\0")
    return f"{size}px-{len(ids)}-{h.hexdigest()[:16]}"


class ImageCache:
    """A complete cache entry: `pixels` (N, 3, S, S) uint8, memory-mapped, and `sizes` (N, 2) original (h, w)."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / META).read_text())
        self.sizes = np.load(path / SIZES)
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        # Opened lazily, so each DataLoader worker maps the file itself instead of receiving a pickled copy.
        if self._pixels is None:
            self._pixels = np.load(self.path / PIXELS, mmap_mode="r")
        return self._pixels

    @property
    def size(self) -> int:
        return self.meta["size"]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}


def open_cache(images: ImageSet, size: int, interpolation: str = "bicubic", root: Path | None = None,
               workers: int | None = None, show: bool = True) -> ImageCache:
    """The cache entry for `images` at `size`, built first (decoding every image once) if there is none.

    `workers`: decoding processes (None: one per available core). Raises UserError when the cache
    directory cannot be written or the disk is too small.
    """
    root = Path(root) if root is not None else default_cache_dir()
    path = root / "images" / cache_key(images.ids, size, interpolation)
    if (path / META).is_file():
        log.info("image cache hit: %s", path)
        return ImageCache(path)
    _remove_abandoned_builds(path)
    scratch = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _writing(root):
            scratch.mkdir(parents=True)
        _check_space(root, len(images) * 3 * size * size)
        start = time.perf_counter()
        _build(images, size, interpolation, scratch, workers, show, root)
        with _writing(root):
            (scratch / META).write_text(json.dumps({
                "version": FORMAT_VERSION, "size": size, "interpolation": interpolation, "count": len(images),
                "first_id": images.ids[0] if len(images) else None, "build_seconds": time.perf_counter() - start,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
            for name in (PIXELS, SIZES, META):
                _fsync(scratch / name)
            try:
                scratch.rename(path)
            except OSError:
                if not (path / META).is_file():
                    raise
                # Another process finished the same entry first; its copy is as good as ours.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a no-op after a successful rename
    log.info("image cache built: %s (%d images at %d px)", path, len(images), size)
    return ImageCache(path)


class _Resized(Dataset):
    """image i -> (uint8 (3, S, S) squashed to the cache side, its original (h, w))."""

    def __init__(self, images: Sequence[np.ndarray], size: int, interpolation: str):
        self.images = images
        self.size = size
        self.interpolation = _INTERPOLATION[interpolation]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(self.images[i])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"image {i}: expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        if not image.flags.writeable:  # e.g. a view of a PIL image; torch wants memory it may write
            image = image.copy()
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        pixels = TF.resize(chw, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        return pixels.contiguous(), torch.tensor(image.shape[:2], dtype=torch.int32)


def _build(images: ImageSet, size: int, interpolation: str, out: Path, workers: int | None, show: bool,
           root: Path) -> None:
    """Decode and resize every image into out/pixels.npy (written in order, no memory map: a full disk is an
    ordinary error, not a crash) and out/sizes.npy."""
    n = len(images)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, n // _MIN_IMAGES_PER_WORKER)
    # Its own generator: iterating a loader draws a seed, and a draw from the global stream would make
    # the run that builds the cache train differently from the runs that find it.
    loader = DataLoader(_Resized(images.images, size, interpolation), batch_size=32, num_workers=workers,
                        generator=torch.Generator())
    sizes = np.empty((n, 2), dtype=np.int32)
    done = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), disable=not show)
    with _writing(root):
        f = (out / PIXELS).open("wb")
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (n, 3, size, size)})
    with progress, f:
        task = progress.add_task(f"decoding images into the cache ({max(workers, 1)} processes)", total=n)
        for pixels, hw in loader:
            with _writing(root):
                f.write(pixels.numpy().tobytes())
            sizes[done:done + len(hw)] = hw.numpy()
            done += len(hw)
            progress.advance(task, len(hw))
    with _writing(root):
        np.save(out / SIZES, sizes)


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
