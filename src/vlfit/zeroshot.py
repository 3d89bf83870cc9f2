"""Zero-shot classification: the text tower's class prompts as the head, no training."""

from __future__ import annotations

from typing import Any

from accelerate.utils import set_seed

from vlfit.config import Config
from vlfit.data import load_source, stratified_split
from vlfit.data.gpu_transforms import on_device
from vlfit.task import FineTuner, build_classifier
from vlfit.train import evaluate, make_accelerator, make_loader


def zeroshot(cfg: Config) -> dict[str, Any]:
    """Validation loss and accuracy of the zero-shot classifier on the config's split."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.head = "zeroshot"
    accelerator = make_accelerator(cfg.train)
    set_seed(cfg.train.seed)  # presets draw random weights: the same ones as a training run's start
    images = load_source(cfg.data)
    split = stratified_split(images.labels, cfg.data.val_fraction, cfg.data.split_seed)
    classifier, _ = build_classifier(cfg, images.classes)
    val_loader = make_loader(cfg, images, split.val, classifier.backbone.preprocess, train=False)
    task, val_loader = accelerator.prepare(FineTuner(classifier, images.classes), val_loader)
    val_loss, val_acc = evaluate(task, on_device(val_loader), accelerator)
    return {"backbone": cfg.model.backbone, "val_loss": val_loss, "val_acc": val_acc, "images": len(split.val),
            "classes": len(images.classes)}
