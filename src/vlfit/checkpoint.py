"""Checkpoints: weights as safetensors, everything else as JSON. No pickle is ever written or read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlfit.errors import UserError
from vlfit.models.classifier import ImageClassifier, classifier_from_architecture

WEIGHTS = "model.safetensors"
STATE = "state.json"


def save_checkpoint(path: Path, model: ImageClassifier, state: dict[str, Any]) -> None:
    """Write `path/` = model.safetensors + state.json, replacing any previous checkpoint there only
    once the new one is complete on disk."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS)
    (tmp / STATE).write_text(json.dumps({**state, "architecture": model.architecture()}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the model saved at `path` (no network needed) and return it with its JSON state."""
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise UserError(f"{path} is not a vlfit checkpoint (expected {WEIGHTS} and {STATE})")
    state = json.loads((path / STATE).read_text())
    model = classifier_from_architecture(state["architecture"])
    weights = load_file(path / WEIGHTS, device=str(device))
    model.load_state_dict(weights, strict=True)
    return model.to(device), state


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
