"""Small components that turn faults into clear outcomes: a stop signal becomes a checkpoint and a
resume hint, a non-finite loss a stop before a bad state is saved, running out of GPU memory a
message that says what to change, and `micro_batch: auto` the largest micro-batch that fits."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator

from vlfit.checkpoint import Checkpoints
from vlfit.config import TrainConfig
from vlfit.errors import UserError

log = logging.getLogger(__name__)

# On the CPU, `micro_batch: auto` does not search: running out of host memory ends a process rather
# than raising, so it takes the largest divisor of the effective batch up to this.
CPU_AUTO_MICRO_BATCH = 64


class RunInterrupted(UserError):
    """The run stopped on a signal after writing a checkpoint; the exit code is the shell's 128 + signal."""

    prefix = "stopped"

    def __init__(self, signum: int, message: str):
        self.exit_code = 128 + signum
        super().__init__(message)


class NonFiniteLoss(UserError):
    """The loss (or the weights) stopped being finite; nothing after the last good checkpoint was saved."""


# ----------------------------------------------------------------------------- between steps


class Safeguards:
    """What the training loop does between optimizer steps to survive faults: settle the loss checks,
    checkpoint when one is due or a stop was asked for, and stop."""

    def __init__(self, checkpoints: Checkpoints, parts: dict[str, Any], meta: dict[str, Any],
                 guard: NonFiniteGuard, stop: GracefulStop, run_dir: Any):
        self.checkpoints, self.parts, self.meta = checkpoints, parts, meta
        self.guard, self.stop, self.run_dir = guard, stop, run_dir

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.guard.observe(loss, grad_norm)

    def after_step(self, progress: Any, skipped: bool, epoch_ends: bool) -> float:
        """Called after each optimizer step; returns the seconds spent writing a checkpoint.

        The periodic checkpoint is left to the epoch's own when the step ends the epoch."""
        self.guard.end_step(progress.step, progress.epoch, skipped)
        spent = 0.0
        if (self.checkpoints.due(progress.step) and not epoch_ends) or self.stop.requested:
            spent = self.save(progress)
        self.stop.raise_if_requested(self.run_dir, f"at step {progress.step} (epoch {progress.epoch})")
        return spent

    def save(self, progress: Any, best: bool = False) -> float:
        """Checkpoint the run as it stands, once the guard has confirmed that it is sound."""
        self.guard.flush(self.parts["model"])
        return self.checkpoints.save(self.parts, {**self.meta, **progress.position()}, best)


# ----------------------------------------------------------------------------- signals


class GracefulStop:
    """While active, SIGINT and SIGTERM ask the run to stop at the next optimizer-step boundary
    (where it writes a checkpoint and raises RunInterrupted); a second signal exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, exit_now: Callable[[int], Any] = os._exit):
        self.signum: int | None = None
        self._exit_now = exit_now
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"\n{name} again: exiting now, without a checkpoint\n")
            self._exit_now(128 + signum)
            return
        self.signum = signum
        _say(f"\n{name}: finishing the current step, then writing a checkpoint (send it again to exit at once)\n")

    def raise_if_requested(self, run_dir: Any, where: str) -> None:
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise RunInterrupted(self.signum, f"{name} received; checkpoint written {where}.\n"
                                              f"  Resume with: vlfit train --resume {run_dir}")


def _say(text: str) -> None:
    os.write(2, text.encode())  # a signal handler must not re-enter a buffered stream mid-write


# ----------------------------------------------------------------------------- non-finite loss


class NonFiniteGuard:
    """Stops a run whose loss or weights stop being finite, before a bad state reaches a checkpoint.

    Without a loss scaler the first step with a non-finite loss (or gradient norm) stops the run.
    With fp16's scaler, overflowing steps are skipped by the scaler and counted here; the run stops
    when the loss has been non-finite for `patience` optimizer steps in a row. Flags stay on the
    device and are read one step late, so the GPU never waits for the check; `flush` settles them
    all, and is called before every checkpoint.
    """

    def __init__(self, patience: int, scaler: bool):
        self.patience = patience if scaler else 1
        self.scaler = scaler
        self.streak = 0  # consecutive optimizer steps with a non-finite loss
        self.skipped = 0  # optimizer steps the scaler skipped
        self._bad: torch.Tensor | None = None
        self._pending: deque[tuple[int, int, torch.Tensor | None]] = deque()

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Note one micro-batch's loss (and, at a step, the gradient norm) without waiting for it."""
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None and not self.scaler:  # with a scaler, an inf norm is just a skipped step
            bad = bad | ~torch.isfinite(grad_norm)
        self._bad = bad if self._bad is None else self._bad | bad

    def end_step(self, step: int, epoch: int, skipped: bool) -> None:
        """Close optimizer step `step`; settle the one before it (whose result is surely ready)."""
        self.skipped += skipped
        self._pending.append((step, epoch, self._bad))
        self._bad = None
        while len(self._pending) > 1:
            self._settle(*self._pending.popleft())

    def flush(self, model: torch.nn.Module) -> None:
        """Settle every pending step and check that the weights are finite: call before saving."""
        while self._pending:
            self._settle(*self._pending.popleft())
        params = [p.detach() for p in model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteLoss("the weights are no longer finite (a non-finite gradient reached them); the run "
                                f"stopped and its checkpoints hold the last good state. {_ADVICE}")

    def _settle(self, step: int, epoch: int, bad: torch.Tensor | None) -> None:
        if bad is None or not bool(bad):
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.patience:
            first = step - self.streak + 1
            when = f"at optimizer step {step}" if self.streak == 1 else \
                f"for {self.streak} optimizer steps in a row (steps {first}-{step})"
            raise NonFiniteLoss(f"the loss became non-finite (nan or inf) {when}, epoch {epoch}; the run "
                                f"stopped and its checkpoints hold the last good state. {_ADVICE}")

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.skipped = state["streak"], state["skipped"]


_ADVICE = ("Lower train.lr or raise train.warmup_ratio, keep train.grad_clip on, or train in bf16 instead of "
           "fp16 (fp16 CLIP fine-tunes are known to overflow).")


# ----------------------------------------------------------------------------- GPU memory


@contextmanager
def explain_oom(cfg: TrainConfig, phase: str) -> Iterator[None]:
    """Turn running out of GPU memory during `phase` ("training" or "evaluation") into a UserError
    that names the batch settings and what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg, phase)) from None


def oom_message(cfg: TrainConfig, phase: str) -> str:
    if phase == "evaluation":
        return (f"out of GPU memory while evaluating with train.eval_batch {cfg.eval_batch}; "
                f"set train.eval_batch to {max(1, cfg.eval_batch // 2)} (it does not change the results)")
    micro, accum = cfg.micro_batch, cfg.accum_steps
    effective = micro * accum
    if micro == 1:
        return (f"out of GPU memory while training with train.micro_batch 1 (train.accum_steps {accum}): even "
                "one image does not fit; use train.precision bf16, or a smaller backbone")
    half = next(m for m in range(micro // 2, 0, -1) if effective % m == 0)
    return (f"out of GPU memory while training with train.micro_batch {micro} x train.accum_steps {accum} "
            f"(effective batch {effective}).\n"
            f"  Keep the effective batch with smaller micro-batches: --set train.micro_batch={half} "
            f"--set train.accum_steps={effective // half}\n"
            f"  or let vlfit find the largest that fits: --set train.micro_batch=auto "
            f"--set train.accum_steps=1 --set train.effective_batch={effective}")


def resolve_micro_batch(cfg: TrainConfig, model: torch.nn.Module, accelerator: Accelerator,
                        recorded: tuple[int, int] | None = None) -> TrainConfig:
    """`cfg` with `micro_batch: auto` replaced by a number, and accum_steps chosen so that
    micro_batch x accum_steps is still `effective_batch`.

    A resumed run passes the `(micro_batch, accum_steps)` it `recorded`, so its batches do not
    depend on how much memory is free today. On a GPU the largest divisor of the effective batch
    whose training step fits is searched; on the CPU the largest divisor up to CPU_AUTO_MICRO_BATCH.
    """
    if cfg.micro_batch != "auto":
        return cfg
    effective = cfg.effective_batch
    assert effective is not None  # the config's validation guarantees it
    candidates = [m for m in range(1, effective + 1) if effective % m == 0]
    if recorded is not None:
        micro = recorded[0]
    elif accelerator.device.type != "cuda":
        micro = max(m for m in candidates if m <= CPU_AUTO_MICRO_BATCH)
    else:
        size = model.backbone.preprocess.image_size  # type: ignore[union-attr]
        micro = largest_fitting(candidates, lambda m: step_fits(model, m, size, accelerator))
        if micro is None:
            raise UserError("out of GPU memory: not even train.micro_batch 1 fits a training step; use "
                            "train.precision bf16, or a smaller backbone")
        # Every process must cut the batch the same way: take the smallest fit among them.
        micro = int(accelerator.gather(torch.tensor([micro], device=accelerator.device)).min())
    log.info("micro_batch auto: %d x %d accumulation steps = effective batch %d", micro, effective // micro, effective)
    return TrainConfig.model_validate({**cfg.model_dump(), "micro_batch": micro, "accum_steps": effective // micro})


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of the ascending `candidates` for which `fits` holds, by bisection (whatever fits,
    every smaller candidate fits too); None if not even the smallest does."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def step_fits(model: torch.nn.Module, micro_batch: int, image_size: int, accelerator: Accelerator) -> bool:
    """Whether one training step of `micro_batch` random images fits in GPU memory, with room kept
    for AdamW's two moments. Leaves the model's weights, gradients and the random streams as they were."""
    device = accelerator.device
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            moments = torch.empty(2 * trainable, dtype=torch.float32, device=device)
            pixels = torch.randn(micro_batch, 3, image_size, image_size, device=device)
            with accelerator.autocast():
                model(pixels).float().logsumexp(-1).mean().backward()
            del moments, pixels
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
