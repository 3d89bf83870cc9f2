"""What a run measures: accuracy sums kept on the device, peak memory, and the metrics.jsonl file."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class RunningMetrics:
    """Loss and accuracy sums that stay on the device until `compute()`, so a step never waits on the host."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """`loss` is the batch mean; weighted by the batch size so the epoch value is a per-image mean."""
        n = labels.shape[0]
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.detach().argmax(dim=-1) == labels).sum()
        self.count += n

    def compute(self) -> tuple[float, float]:
        """(mean loss, accuracy) over everything seen; one host sync."""
        if self.count == 0:
            return float("nan"), float("nan")
        return self.loss_sum.item() / self.count, self.correct.item() / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.correct.copy_(state["correct"])
        self.count = state["count"]


class DeviceTimer:
    """Accumulates the time spent in timed blocks without making the host wait on a GPU.

    On CUDA, each block records a pair of events and the elapsed times are read once, in `total()`;
    on the CPU, wall-clock time.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0

    def total(self) -> float:
        """Seconds spent in timed blocks since the last reset (synchronises with the GPU once)."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, kind): CUDA peak allocated since the last reset on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"


class MetricsLog:
    """Appends one JSON object per line; `read` returns them in order."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file by `records`: a resumed run drops lines written after its checkpoint."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.path)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """TensorBoard event files in the run directory, beside metrics.jsonl: the training loss and
    learning rate per optimizer step (`train/loss`, `train/lr`) and every number of each
    metrics.jsonl record per epoch (`epoch/<key>`), all against the optimizer step.

    Step losses stay on the device until `log_epoch`, so logging adds no host sync to a step.
    `step` counts optimizer steps; a resumed run sets it to the steps already taken.
    """

    def __init__(self, log_dir: Path, enabled: bool = True, step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imports TensorFlow's protobufs: only when a run starts

        self.writer = SummaryWriter(str(log_dir)) if enabled else None
        self.step = step
        self._micro: list[torch.Tensor] = []  # losses of the current optimizer step's micro-batches
        self._steps: list[tuple[int, torch.Tensor, float]] = []  # (step, mean loss, lr) not yet written

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_step(self, loss: torch.Tensor, lr: float, optimizer_stepped: bool) -> None:
        self._micro.append(loss.detach().float())
        if optimizer_stepped:
            self.step += 1
            self._steps.append((self.step, torch.stack(self._micro).mean(), lr))
            self._micro = []

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self._steps = []
            return
        losses = torch.stack([loss for _, loss, _ in self._steps]).tolist() if self._steps else []
        for (step, _, lr), loss in zip(self._steps, losses):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        self._steps = []
        at = record.get("step", self.step)
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, at)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
