"""What lets a killed run continue exactly: its progress, the global random streams as state, and
augmentation that depends on the image and the epoch rather than on how many draws came before.

Data order is already a function of (seed, epoch) through Accelerate's seedable sampler. Augmentation
is made one too (`SeededSamples` on the torchvision pipeline, `sample_uniforms` on the cached one),
so a resumed epoch can skip the batches it has seen without drawing their random crops, and the
global streams (dropout and anything else the model draws) are saved and restored as they stood
after the last finished step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from vlfit.metrics import RunningMetrics


@dataclass
class Progress:
    """Where a run stands: the epoch under way, micro-batches done in it, optimizer steps so far, the
    loss/accuracy sums and training seconds of the unfinished epoch, and the records of finished ones.

    The sums (`running`) differ between processes and are saved as a part of their own."""

    running: RunningMetrics
    epoch: int = 1
    batches_done: int = 0
    step: int = 0
    epoch_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def finish_epoch(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.epoch += 1
        self.batches_done = 0
        self.epoch_seconds = 0.0
        self.running.reset()

    def position(self) -> dict[str, Any]:
        """What a checkpoint taken now holds, in words a reader of state.json understands."""
        mid_epoch = self.batches_done > 0
        last = self.history[-1] if self.history and not mid_epoch else {}
        return {"epoch": self.epoch if mid_epoch else self.epoch - 1, "step": self.step, "mid_epoch": mid_epoch,
                "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss")}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
                "epoch_seconds": self.epoch_seconds, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        self.epoch_seconds, self.history = state["epoch_seconds"], list(state["history"])


class RNGState:
    """The global random streams (Python, NumPy, torch CPU and CUDA) as a state_dict of lists and tensors."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            # Only a process that used CUDA has CUDA streams to save; asking would otherwise start CUDA.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


@contextmanager
def rng_untouched(device: torch.device) -> Iterator[None]:
    """Run a block without moving torch's global random streams (the CPU's, and `device`'s if a GPU)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


class SharedEpoch:
    """An epoch number in shared memory, so persistent loader workers see `set` too."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value.fill_(epoch)

    def get(self) -> int:
        return int(self._value)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def sample_uniforms(seed: int, epoch: int, samples: Any, n: int) -> np.ndarray:
    """(len(samples), n) float64 uniforms in [0, 1): row k depends only on (seed, epoch, samples[k]).

    A counter-based generator (SplitMix64 of a per-(seed, epoch) key and the draw's index), so a
    whole batch is drawn in a few vectorised operations, in any order, on any process.
    """
    key = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    counter = np.asarray(samples, dtype=np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
    z = key + (counter + np.uint64(1)) * _GOLDEN  # uint64 arithmetic wraps, as SplitMix64 wants
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SeededSamples(Dataset):
    """`dataset[i]` drawn with torch's CPU generator seeded by (seed, epoch, i), then put back as it was.

    Random augmentation then depends only on the image and the epoch: a resumed epoch skips the
    batches it has seen without replaying their draws, and the number of loader workers changes
    nothing.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        seed = np.random.SeedSequence([self.seed, self.epoch.get(), i]).generate_state(1, np.uint64)[0]
        outer = torch.get_rng_state()
        torch.default_generator.manual_seed(int(seed))  # CPU only: the CUDA streams belong to the model
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(outer)


def epoch_batches(accelerator: Accelerator, loader: DataLoader, epoch: int, skip: int = 0):
    """The batches of `epoch` (1-based) after the first `skip`: the same batches, in the same order,
    with the same augmentation, whether the epoch runs whole or resumes part way."""
    loader.set_epoch(epoch - 1)  # type: ignore[attr-defined]  # Accelerate's loaders: data order of this epoch
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch - 1)
    return accelerator.skip_first_batches(loader, skip) if skip else loader
