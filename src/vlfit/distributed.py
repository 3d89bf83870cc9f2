"""Several processes (`accelerate launch`, `torchrun`, SLURM): who writes, how the others learn what
the main process decided, and which state differs from process to process.

Every process runs the same code. Files are written by the main process only; a decision that
reads or changes the disk (is this run directory free? which checkpoint is good?) is taken there
and handed to the others, so processes never race on a file. With one process every helper here is
a plain call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from vlfit.errors import UserError

T = TypeVar("T")


class ErrorElsewhere(UserError):
    """Another process stopped with a UserError and has said why; this one stops quietly with its exit code."""

    quiet = True

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__("stopped because another process did")


def process_index() -> int:
    """This process's global rank as the launcher set it (0 when not launched), without starting anything."""
    return int(os.environ.get("RANK", "0"))


def joined() -> bool:
    """Whether this process has joined the others (or knows it is alone): before that, every process
    does the same work and meets the same errors."""
    return bool(PartialState._shared_state)


def start_processes(cpu: bool) -> PartialState:
    """Join the launched processes (a no-op without a launcher): gloo on CPUs, NCCL on GPUs."""
    return PartialState(cpu=cpu)


def main_decides(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run by the main process only; every process gets its result, or raises
    when it raised (the message is printed once, by the main process)."""
    if alone():
        return fn(*args, **kwargs)
    state = PartialState()
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except BaseException as err:  # the others must learn of any failure, or they wait forever
            failure = err
            outcome = [("error", getattr(err, "exit_code", 1))]
    broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise ErrorElsewhere(value)
    return value


def together(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run by every process; if any of them raises a UserError, all of them stop,
    and one message is printed for each different problem (not one per process)."""
    if alone():
        return fn(*args, **kwargs)
    state = PartialState()
    try:
        result, failure = fn(*args, **kwargs), None
    except UserError as err:
        result, failure = None, err
    errors = gather_object([None if failure is None else (str(failure), failure.exit_code)])
    if not any(errors):
        return result  # type: ignore[return-value]
    mine = errors[state.process_index]
    if failure is not None and errors.index(mine) == state.process_index:
        raise failure  # the first process that failed this way speaks for all that did
    raise ErrorElsewhere(next(e for e in errors if e)[1])


def leave_processes() -> None:
    """End a command together: wait for every process, then close the process group. Left to the
    interpreter's exit while another process still talks to it, gloo's threads abort the process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wait_for_everyone() -> None:
    if not alone():
        PartialState().wait_for_everyone()


def alone() -> bool:
    """True for a process that has not joined others (the helpers here then just call)."""
    return not joined() or PartialState().num_processes == 1


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class PerProcess:
    """A stateful part that differs between processes (random streams, running sums): a checkpoint
    holds each process's state, and each process restores its own.

    `state_dict()` gathers from every process, so every process must call it at the same moment.
    A checkpoint written by another number of processes cannot be restored: that is a UserError."""

    def __init__(self, part: Any):
        self.part = part

    def state_dict(self) -> dict[str, Any]:
        return {"processes": gather_object([_to_cpu(self.part.state_dict())])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        processes = PartialState()
        saved = state["processes"]
        if len(saved) != processes.num_processes:
            raise UserError(f"the checkpoint was written by {len(saved)} processes and this run has "
                            f"{processes.num_processes}; resume with {len(saved)} processes")
        self.part.load_state_dict(saved[processes.process_index])


def _to_cpu(obj: Any) -> Any:
    """`obj` with its tensors on the CPU: a state gathered from a GPU process must unpickle anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class AnyProcess:
    """Whether a number is set on any process, as the largest across processes: how a stop signal that
    reached one process stops them all at the same optimizer step. A CPU all-reduce over a gloo group,
    so asking never waits for a GPU."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if PartialState().num_processes > 1 else None

    def __call__(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def across_processes(values: list[float]) -> list[list[float]]:
    """Each process's `values`, in process order, on every process."""
    return [list(v) for v in gather_object([list(values)])]


class FullState:
    """A model, or with `optimizer` that optimizer, sharded by FSDP, seen as full tensors on the CPU:
    a checkpoint holds the same files whatever the sharding, and `vlfit eval` reads it on one device.
    Anything else is asked of the model itself (`architecture()`, `parameters()`)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on the main process
        if self.optimizer is None:
            return get_model_state_dict(self.module, options=options)
        return get_optimizer_state_dict(self.module, self.optimizer, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        if self.optimizer is None:
            set_model_state_dict(self.module, state, options=options)
        else:
            set_optimizer_state_dict(self.module, self.optimizer, state, options=options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)
