"""Evaluate a finished run's checkpoint on the validation split the run itself wrote down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlfit.checkpoint import load_checkpoint
from vlfit.config import load_config
from vlfit.data import load_source, load_split
from vlfit.data.gpu_transforms import on_device
from vlfit.errors import UserError
from vlfit.task import FineTuner
from vlfit.train import evaluate, make_accelerator, make_loader


def evaluate_run(run_dir: Path, which: str = "best") -> dict[str, Any]:
    """Reload `run_dir/checkpoints/<which>` and score it on the run's own validation images."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a vlfit run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    accelerator = make_accelerator(cfg.train)
    model, state = load_checkpoint(run_dir / "checkpoints" / which)
    images = load_source(cfg.data)
    if images.classes != state["classes"]:
        raise UserError(f"{run_dir}: the data's classes differ from the checkpoint's")
    split = load_split(run_dir / "split.json", images)
    loader = make_loader(cfg, images, split.val, model.backbone.preprocess, train=False)
    task, loader = accelerator.prepare(FineTuner(model, images.classes), loader)
    val_loss, val_acc = evaluate(task, on_device(loader), accelerator)
    return {"checkpoint": which, "epoch": state["epoch"], "val_loss": val_loss, "val_acc": val_acc,
            "recorded_val_acc": state["val_acc"], "images": len(split.val)}
