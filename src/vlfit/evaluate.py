"""Evaluate a checkpoint: accuracy, top-5 accuracy, macro F1, per-class accuracy and the confusion matrix.

Every finished run holds `eval.json`: these numbers for its best checkpoint on its own validation
split, written at the end of training, so a report never has to run a model again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from vlfit.checkpoint import load_checkpoint
from vlfit.config import DataConfig, load_config
from vlfit.data import ImageSet, load_source, load_split, survey_data
from vlfit.data.gpu_transforms import on_device
from vlfit.data.loaders import make_loader
from vlfit.data.prepare import refuse
from vlfit.errors import UserError

EVAL_FILE = "eval.json"  # best checkpoint on the run's own validation split: what the report reads


def evaluate_run(run_dir: Path, which: str = "best", data: list[str] = ()) -> dict[str, Any]:
    """Score `run_dir/checkpoints/<which>` and write the result as JSON in the run directory.

    Without `data`, the images are exactly the run's validation split as its split.json lists them.
    `data` holds `key=value` overrides of the run's data section (e.g. `seed=1`); that data is then
    checked as training checks it, and the kept images of its data.val_split (if set, else of its
    data.train_split) are scored. Data whose labels cannot score a classifier is refused, and so is
    any image the run trained on. The result carries `path`, where it was written.
    """
    from vlfit.train import make_accelerator  # not at the top: train imports this module

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "split.json").is_file():
        raise UserError(f"{run_dir} is not a vlfit run directory (no config.yaml and split.json)")
    cfg = load_config(run_dir / "config.yaml", [f"data.{d.removeprefix('data.')}" for d in data])
    accelerator = make_accelerator(cfg.train)
    if data:
        images = _checked_data(cfg.data, data, set(json.loads((run_dir / "split.json").read_text())["train"]))
        index, described = np.arange(len(images)), {"data": list(data), "split": cfg.data.val_split or "all"}
    else:
        # The images of split.json alone, each of which passed the run's data check (the data's unusable files
        # are still there, and the cached pipeline decodes every image of the set it is given): in id order,
        # as training held them, so the cache entry training built is the one read.
        images = load_source(cfg.data)
        split = load_split(run_dir / "split.json", images)
        kept = np.union1d(split.train, split.val)
        images, index, described = images.subset(kept), np.searchsorted(kept, split.val), {"split": "val"}

    model, state = load_checkpoint(run_dir / "checkpoints" / which, accelerator.device)
    if images.classes != state["classes"]:
        raise UserError(f"{run_dir}: the data's classes differ from the checkpoint's")
    loader = make_loader(cfg, images, index, model.backbone.preprocess, train=False)
    result = {**score(model, state, on_device(accelerator.prepare(loader)), accelerator, which),
              **described}  # every process: it gathers
    path = run_dir / eval_file_name(which, data)
    if accelerator.is_main_process:
        save_eval(path, result)
    return {**result, "path": str(path)}


def evaluate_checkpoint(checkpoint: Path, loader: DataLoader, accelerator: Accelerator) -> dict[str, Any]:
    """Load the checkpoint at `checkpoint` onto the accelerator's device and score it on `loader`."""
    model, state = load_checkpoint(checkpoint, accelerator.device)
    return score(model, state, loader, accelerator, checkpoint.name)


def score(model: torch.nn.Module, state: dict[str, Any], loader: DataLoader, accelerator: Accelerator,
          checkpoint: str) -> dict[str, Any]:
    """`classification_metrics` of `model` on `loader`, with which checkpoint and epoch were scored."""
    logits, labels = predict_logits(model, loader, accelerator)
    return {"checkpoint": checkpoint, "epoch": state["epoch"], "recorded_val_acc": state["val_acc"],
            **classification_metrics(logits, labels, state["classes"])}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32, labels) on the CPU for every sample of `loader`, each counted once across processes."""
    model.eval()
    all_logits, all_labels = [], []
    for pixels, labels in loader:
        with accelerator.autocast():  # the precision the run was trained and validated in
            logits = model(pixels)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss, accuracy, top-5 accuracy, macro F1, per-class numbers and the confusion matrix.

    `confusion_matrix[t][p]` counts images of true class t predicted as p. A class's accuracy is
    the share of its images classified correctly (its recall); it is None for a class with no
    images. Macro F1 averages F1 over the classes that occur as a label or a prediction.
    """
    n = len(classes)
    labels = labels.long()
    pred = logits.argmax(dim=-1)
    k = min(5, n)
    in_top_k = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    cm = np.bincount((labels * n + pred).numpy(), minlength=n * n).reshape(n, n)
    hits, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    seen = (support + predicted) > 0
    f1 = np.divide(2 * hits, support + predicted, out=np.zeros(n), where=seen)
    per_class = [
        {"class": c, "support": int(support[i]),
         "accuracy": float(hits[i] / support[i]) if support[i] else None,
         "precision": float(hits[i] / predicted[i]) if predicted[i] else None,
         "f1": float(f1[i]) if seen[i] else None}
        for i, c in enumerate(classes)
    ]
    return {
        "images": int(labels.numel()),
        # float64 sums, as the training loop's validation, so the two agree to rounding
        "val_loss": F.cross_entropy(logits.double(), labels).item(),
        "val_acc": (pred == labels).double().mean().item(),
        "top5_acc": in_top_k.double().mean().item(),
        "top_k": k,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def save_eval(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def eval_file_name(which: str, data: list[str] = ()) -> str:
    """`eval.json` for the best checkpoint on the run's split; otherwise a name that says what was scored."""
    if which == "best" and not data:
        return EVAL_FILE
    slug = re.sub(r"[^A-Za-z0-9=._-]+", "_", ",".join(d.removeprefix("data.") for d in data))
    return f"eval-{which}" + (f"-{slug}" if slug else "") + ".json"


def _checked_data(cfg: DataConfig, data: list[str], train_ids: set[str]) -> ImageSet:
    """The images `--data` scores: the kept images of cfg's validation split (else its training split) after
    the load-time check training runs, refused as training would refuse them, or if the run trained on any."""
    survey = survey_data(cfg)
    scored = cfg.val_split or cfg.train_split
    problems = survey.file_problems()
    if why := survey.evaluation_problem(scored):
        problems.append(f"--data {' '.join(data)}: {scored!r} cannot be used for evaluation: {why}")
    refuse(problems)
    images, origin, _ = survey.image_set()
    images = images.subset(np.flatnonzero(origin == scored))
    leaked = [i for i in images.ids if i in train_ids]
    if leaked:
        raise UserError(f"--data {' '.join(data)}: {len(leaked)} of its {len(images)} images were used to train "
                        f"this run (e.g. {leaked[0]}); score data the run has not seen, such as another "
                        "data.seed for synthetic-har")
    return images
