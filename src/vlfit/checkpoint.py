"""Checkpoints: tensors as safetensors, everything else as JSON, written atomically, verified on load.

A checkpoint is a directory:

    model.safetensors     the model's weights, keyed as its state_dict (all `vlfit eval` needs)
    <part>.safetensors    the tensors of each other stateful part: optimizer moments, RNG states, ...
    state.json            what the checkpoint is (epoch, step, classes, config, architecture), the
                          plain-data rest of every part, and the SHA-256 of every file and of itself

Nothing here writes or reads a pickle, so loading a checkpoint cannot run code; a file holding one
is refused before anything parses it. A directory appears under its final name only once every
byte of it is on disk, and a damaged one (truncated, edited, half-copied) fails its checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlfit.errors import UserError
from vlfit.models.classifier import ImageClassifier, classifier_from_architecture

log = logging.getLogger(__name__)

FORMAT = "vlfit-checkpoint/1"
WEIGHTS = "model.safetensors"
STATE = "state.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or holds something vlfit will not load."""


# ----------------------------------------------------------------------------- one checkpoint


def save_checkpoint(path: Path, parts: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write every part's state_dict and `meta` as the checkpoint directory `path`.

    `parts` maps a name to anything with `state_dict()`; its tensors go to `<name>.safetensors`
    (so the "model" part is `model.safetensors`), the rest to state.json. The directory is built
    under a temporary name, fsynced, and renamed into place: `path` is always either the old
    checkpoint or the complete new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skeletons, files = {}, {}
    for name, part in parts.items():
        tensors: dict[str, torch.Tensor] = {}
        skeletons[name] = _encode(part.state_dict(), "", tensors)
        if tensors:
            file = f"{name}.safetensors"
            save_file(tensors, tmp / file)
            files[file] = _sha256(tmp / file)
    body = {"format": FORMAT, "meta": meta, "parts": skeletons, "files": files}
    (tmp / STATE).write_text(json.dumps({**body, "sha256": _digest(body)}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    _install(tmp, path)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(state, tensors by file) of the checkpoint at `path`, every checksum verified.

    Raises CheckpointError naming what is wrong: not a checkpoint, a pickle, or damaged."""
    state = read_state(path)
    tensors = {}
    for file, digest in state["files"].items():
        actual = _sha256(path / file) if (path / file).is_file() else "missing"
        if actual != digest:
            size = (path / file).stat().st_size if (path / file).is_file() else 0
            raise CheckpointError(f"{path / file} is damaged: its checksum does not match state.json "
                                  f"({size} bytes; truncated or modified?)")
        tensors[file] = load_file(path / file)
    return state, tensors


def read_state(path: Path) -> dict[str, Any]:
    """The verified state.json of the checkpoint at `path` (the tensor files are not read)."""
    _refuse_pickles(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a vlfit checkpoint (no {STATE})")
    try:
        state = json.loads((path / STATE).read_text())
        body = {k: v for k, v in state.items() if k != "sha256"}
        intact = state.get("format") == FORMAT and state["sha256"] == _digest(body)
    except (ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise CheckpointError(f"{path / STATE} is damaged or not from this vlfit version (its checksum "
                              "does not match; truncated or modified?)")
    return state


def restore_parts(parts: dict[str, Any], state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load every part from a checkpoint read by `read_checkpoint`; a part it lacks is an error."""
    missing = sorted(set(parts) - set(state["parts"]))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {', '.join(missing)}: it was written by a "
                              "run with other settings")
    for name, part in parts.items():
        part.load_state_dict(_decode(state["parts"][name], tensors.get(f"{name}.safetensors", {})))


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the model saved at `path` (no network needed) and return it with the checkpoint's meta."""
    state, tensors = read_checkpoint(path)
    meta = state["meta"]
    model = classifier_from_architecture(meta["architecture"])
    model.load_state_dict(_decode(state["parts"]["model"], tensors[WEIGHTS]), strict=True)
    return model.to(device), meta


# ----------------------------------------------------------------------------- a run's checkpoints


class Checkpoints:
    """A run's `checkpoints/`: `last` (newest), `previous` (the one before, kept as a fallback) and `best`.

    Every checkpoint holds the whole training state, so a run can resume from any of them and,
    being deterministic, still finish exactly as it would have.
    """

    def __init__(self, root: Path, every: int | None = None, writer: bool = True):
        self.root = root
        self.every = every
        self.writer = writer  # with several processes, only the main one writes

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` ends on a periodic checkpoint."""
        return self.every is not None and step % self.every == 0

    def save(self, parts: dict[str, Any], meta: dict[str, Any], best: bool = False) -> float:
        """Write `last` (the old `last` becomes `previous`), and `best` too if `best`; returns seconds taken."""
        start = time.perf_counter()
        if not self.writer:
            return 0.0
        save_checkpoint(self.root / "last", parts, meta)
        if best:
            _copy_checkpoint(self.root / "last", self.root / "best")
        log.info("checkpoint: epoch %s, step %s%s", meta["epoch"], meta["step"], " (best)" if best else "")
        return time.perf_counter() - start

    def newest_good(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint furthest along that passes every check, as (path, state); None if the run
        has none yet.

        Damaged checkpoints are logged and renamed `<name>.damaged` (kept, never deleted), so the
        next save does not rotate one into `previous`. Half-installed directories (`*.tmp`, `*.old`)
        count too: a crash between two renames must not lose the newest state. If checkpoints exist
        but none is usable, that is a CheckpointError, not a silent fresh start."""
        candidates = []
        for path in sorted(p for p in self.root.glob("*") if p.is_dir() and not p.name.endswith(".damaged")):
            if path.name.endswith(".tmp") and not (path / STATE).exists():
                continue  # a write the crash cut short: never a checkpoint, removed by the next save
            try:
                meta = json.loads((path / STATE).read_text())["meta"]
                candidates.append(((meta["step"], not meta["mid_epoch"]), path))
            except (OSError, ValueError, KeyError, TypeError):
                candidates.append(((-1, False), path))  # unreadable: tried last, reported below
        damaged: list[tuple[Path, CheckpointError]] = []
        for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
            try:
                state, _ = read_checkpoint(path)  # the full check, tensors included
            except CheckpointError as err:
                damaged.append((path, err))
                continue
            for bad, err in damaged:
                log.warning("checkpoint %s is unusable, resuming from %s instead: %s", bad.name, path.name, err)
                if self.writer:
                    shutil.rmtree(bad.with_name(bad.name + ".damaged"), ignore_errors=True)
                    bad.rename(bad.with_name(bad.name + ".damaged"))
            return path, state
        if damaged:
            raise CheckpointError(f"no usable checkpoint in {self.root}:\n" + "\n".join(f"  {e}" for _, e in damaged))
        return None


def _install(tmp: Path, path: Path) -> None:
    """Rename the complete directory `tmp` to `path`; a `last` being replaced becomes `previous`."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    if path.name == "last":
        previous = path.with_name("previous")
        shutil.rmtree(previous, ignore_errors=True)
        if old.exists():
            old.rename(previous)
    shutil.rmtree(old, ignore_errors=True)


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Install a copy of checkpoint `src` as `dst`: hard links where the filesystem has them (no bytes
    copied; checkpoint files are never modified in place, so sharing them is safe)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
            _fsync(tmp / f.name)
    _fsync(tmp)
    _install(tmp, dst)


# ----------------------------------------------------------------------------- encoding without pickle


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-able data, its tensors moved into `tensors` under dotted names that say where they
    were. Tuples and dicts with non-string keys (an optimizer's per-parameter state) are tagged so
    that `_decode` gives back exactly what `state_dict()` returned."""
    def at(key: Any) -> str:
        return f"{name}.{key}" if name else str(key)

    if isinstance(obj, torch.Tensor):
        while name in tensors:  # 'a.b' as a key and as a path: rare, but must not collide
            name += "~"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, at(k), tensors) for k, v in obj.items()}
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in obj):
            raise TypeError(f"cannot store a dict keyed by {sorted({type(k).__name__ for k in obj})} without pickle")
        return {"__items__": [[k, _encode(v, at(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, at(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, at(i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{name}' in a checkpoint without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------- files


def _refuse_pickles(path: Path) -> None:
    """Refuse a checkpoint directory that holds pickle files, before any byte of it is parsed."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a vlfit checkpoint (no such directory)")
    for f in sorted(path.iterdir()):
        if f.suffix in PICKLE_SUFFIXES or (f.suffix == ".safetensors" and _is_pickle(f)):
            raise CheckpointError(f"{f} holds a pickle (torch.save/pickle format), which can run code when "
                                  "loaded; vlfit refuses it and loads only safetensors")


def _is_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    # Pickle protocols 2-5 open with 0x80 and the protocol number; torch.save zips a pickle.
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head == b"PK\x03\x04"


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
