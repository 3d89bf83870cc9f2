"""The image cache: built once, reused, keyed by data and side, and never left half-built."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vlfit.data import ImageSet
from vlfit.data.cache import ImageCache, cache_key, open_cache, stored_size
from vlfit.errors import UserError


class CountingImages:
    """A lazy image sequence that counts decodes, like a folder source reading files."""

    def __init__(self, arrays, fail_at=None):
        self.arrays, self.fail_at, self.decoded = arrays, fail_at, 0

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt  # the user pressed Ctrl-C halfway through the build
        self.decoded += 1
        return self.arrays[i]


def image_set(n=12, seed=0, fail_at=None, prefix="img"):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(20, 60)), int(rng.integers(20, 60))) for _ in range(n)]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    return ImageSet(CountingImages(arrays, fail_at), np.arange(n) % 3, ["a", "b", "c"],
                    [f"{prefix}/{seed}/{i}" for i in range(n)])


def entries(root):
    return sorted(p.name for p in (root / "images").iterdir()) if (root / "images").is_dir() else []


def test_built_once_then_reused_without_decoding(tmp_path):
    first = image_set()
    cache = open_cache(first, 24, root=tmp_path, show=False)
    assert first.images.decoded == 12 and len(cache) == 12
    assert [tuple(s) for s in cache.sizes] == [a.shape[:2] for a in first.images.arrays]
    for i, original in enumerate(first.images.arrays):
        stored = cache.image(i)
        assert stored.dtype == np.uint8 and stored.shape == (3, *stored_size(*original.shape[:2], 24))
        if min(original.shape[:2]) <= 24:  # small enough: kept exactly as decoded
            assert np.array_equal(stored, original.transpose(2, 0, 1))
    assert any(min(a.shape[:2]) > 24 for a in first.images.arrays)  # and some were shrunk
    # A uniform image stays uniform through the shrink: pixels land where they belong.
    flat = ImageSet(CountingImages([np.full((30, 50, 3), (10, 20, 30), np.uint8)]), np.array([0]), ["a"], ["flat"])
    shrunk = open_cache(flat, 16, root=tmp_path, show=False).image(0)
    assert shrunk.shape == (3, 16, 27) and (shrunk == np.array([10, 20, 30])[:, None, None]).all()

    again = image_set()  # the same data in a new process-like object: nothing is decoded
    reused = open_cache(again, 24, root=tmp_path, show=False)
    assert again.images.decoded == 0
    assert reused.path == cache.path and np.array_equal(reused.pixels, cache.pixels)


def test_stored_size_keeps_small_images_and_the_aspect_of_large_ones():
    assert stored_size(160, 240, 448) == (160, 240)  # a HAR thumbnail at 224 px: as it is
    assert stored_size(900, 1200, 448) == (448, 597)  # shorter side to the limit
    assert stored_size(300, 2000, 448) == (134, 896)  # a panorama: longer side to twice the limit


def test_building_leaves_the_global_random_streams_alone(tmp_path):
    # A run that builds the cache must train exactly like one that finds it (dropout, init draw from these).
    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    open_cache(image_set(), 24, root=tmp_path, show=False)
    assert torch.equal(torch.rand(3), expected)


def test_other_data_side_or_filter_is_another_entry(tmp_path):
    base = open_cache(image_set(), 24, root=tmp_path, show=False)
    variants = [image_set(seed=1), image_set(n=11), image_set(prefix="other")]
    for images in variants:
        cache = open_cache(images, 24, root=tmp_path, show=False)
        assert images.images.decoded == len(images) and cache.path != base.path
    bigger = image_set()
    assert open_cache(bigger, 32, root=tmp_path, show=False).limit == 32 and bigger.images.decoded == 12
    bilinear = image_set()
    open_cache(bilinear, 24, "bilinear", root=tmp_path, show=False)
    assert bilinear.images.decoded == 12
    assert len(entries(tmp_path)) == 6


def test_key_depends_on_order_of_ids():
    assert cache_key(["a", "b"], 24, "bicubic") != cache_key(["b", "a"], 24, "bicubic")
    assert cache_key(["a", "b"], 24, "bicubic") != cache_key(["ab"], 24, "bicubic")


def test_interrupted_build_leaves_nothing_and_next_build_completes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        open_cache(image_set(fail_at=7), 24, root=tmp_path, show=False)
    assert entries(tmp_path) == []  # no entry, no scratch directory
    images = image_set()
    cache = open_cache(images, 24, root=tmp_path, show=False)
    assert images.images.decoded == 12 and len(cache) == 12


def test_killed_build_is_never_used_and_is_cleaned_up(tmp_path):
    # A build in another process, killed with SIGKILL mid-way: no handler runs, its scratch stays behind.
    script = textwrap.dedent(f"""
        import time, numpy as np
        from vlfit.data import ImageSet
        from vlfit.data.cache import open_cache
        class Slow:
            def __len__(self): return 12
            def __getitem__(self, i):
                time.sleep(0.5 if i else 0)
                return np.zeros((20, 20, 3), np.uint8)
        open_cache(ImageSet(Slow(), np.zeros(12, int), ["a"], [f"img/0/{{i}}" for i in range(12)]), 24,
                   root={str(tmp_path)!r}, show=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.time() + 120
    while not any(".partial-" in name for name in entries(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, "the build never started"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [scratch] = entries(tmp_path)
    assert ".partial-" in scratch

    images = image_set()  # same ids as the killed build
    cache = open_cache(images, 24, root=tmp_path, show=False)
    assert images.images.decoded == 12
    assert entries(tmp_path) == [cache.path.name]  # the dead build's scratch is gone
    assert isinstance(ImageCache(cache.path), ImageCache)


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="data.cache_dir"):
        open_cache(image_set(), 24, root=blocker / "cache", show=False)
