"""Zero-shot classification: the text tower's class prompts as the head, no training."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from vlfit.config import Config
from vlfit.data import prepare_data
from vlfit.data.gpu_transforms import on_device
from vlfit.task import FineTuner, build_classifier
from vlfit.data.loaders import make_loader
from vlfit.train import evaluate, make_accelerator


def zeroshot(cfg: Config) -> dict[str, Any]:
    """Validation loss and accuracy of the zero-shot classifier on the config's split."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.head = "zeroshot"
    accelerator = make_accelerator(cfg.train)
    set_seed(cfg.train.seed)  # presets draw random weights: the same ones as a training run's start
    # The same checks, duplicate grouping and split as a training run; the records are not kept.
    with tempfile.TemporaryDirectory() as records:
        images, split = prepare_data(cfg.data, Path(records))
    classifier, _ = build_classifier(cfg, images.classes)
    val_loader = make_loader(cfg, images, split.val, classifier.backbone.preprocess, train=False)
    task, val_loader = accelerator.prepare(FineTuner(classifier, images.classes), val_loader)
    val_loss, val_acc = evaluate(task, on_device(val_loader), accelerator)
    return {"backbone": cfg.model.backbone, "val_loss": val_loss, "val_acc": val_acc, "images": len(split.val),
            "classes": len(images.classes)}
