"""The training recipe: setup, then one loop that trains and evaluates every epoch.

Read top to bottom: `train()` is the whole run; `train_one_epoch()` and `evaluate()` are its two
phases. Device placement, mixed precision and gradient accumulation come from Accelerate, so the
same code runs on a CPU, one GPU, or several.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vlfit import __version__
from vlfit.checkpoint import save_checkpoint
from vlfit.config import Config, TrainConfig
from vlfit.console import EpochView, log_to_file
from vlfit.data import ImageSet, Split, eval_transform, load_source, stratified_split, train_transform
from vlfit.data.sources import TransformedImages
from vlfit.errors import UserError
from vlfit.evaluate import EVAL_FILE, evaluate_checkpoint, save_eval
from vlfit.metrics import MetricsLog, RunningMetrics, TensorBoardLog, peak_memory_mb, reset_peak_memory
from vlfit.models import ImageClassifier, build_backbone, count_parameters

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: Path, show: bool = True) -> dict[str, Any]:
    """Train `cfg` into `run_dir` (which must exist and be empty) and return the run's summary."""
    with log_to_file(run_dir / "train.log"):
        return _train(cfg, run_dir, show)


def _train(cfg: Config, run_dir: Path, show: bool) -> dict[str, Any]:
    # ---- setup
    accelerator = make_accelerator(cfg.train)
    set_seed(cfg.train.seed)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    images = load_source(cfg.data)
    split = stratified_split(images.labels, cfg.data.val_fraction, cfg.data.split_seed)
    split.save(run_dir / "split.json", images, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    (run_dir / "classes.txt").write_text("\n".join(images.classes) + "\n")

    backbone = build_backbone(cfg.model.backbone, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    model = ImageClassifier(backbone, len(images.classes), cfg.model.head_dropout)
    trainable, total = count_parameters(model)
    train_loader, val_loader = make_loaders(cfg, images, split, model)
    optimizer = make_optimizer(model, cfg.train, fused=accelerator.device.type == "cuda")
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accum_steps)
    total_steps = cfg.train.epochs * steps_per_epoch
    # Not handed to accelerator.prepare: the schedule is defined in optimizer steps, stepped below
    # exactly when the optimizer steps.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=round(cfg.train.warmup_ratio * total_steps),
        num_training_steps=total_steps, min_lr_rate=cfg.train.min_lr_ratio,
    )
    log.info("device %s, precision %s, %d train / %d val images, %d classes, %d optimizer steps, "
             "%s trainable of %s parameters", device_name(accelerator.device), accelerator.mixed_precision,
             len(split.train), len(split.val), len(images.classes), total_steps, f"{trainable:,}", f"{total:,}")

    # ---- loop
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    history: list[dict[str, Any]] = []
    best_acc = -1.0
    with EpochView(enabled=show) as view, TensorBoardLog(run_dir, accelerator.is_main_process) as tb:
        for epoch in range(1, cfg.train.epochs + 1):
            reset_peak_memory(accelerator.device)
            view.start_epoch(epoch, cfg.train.epochs, len(train_loader))
            train_loss, train_acc, train_time, n_seen = train_one_epoch(
                model, train_loader, optimizer, scheduler, accelerator, cfg.train, view, tb)
            val_loss, val_acc = evaluate(model, val_loader, accelerator)
            peak_mb, mem_kind = peak_memory_mb(accelerator.device)
            record = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                "val_loss": val_loss, "val_acc": val_acc, "epoch_time_s": train_time,
                "train_images_per_s": n_seen / train_time, "peak_mem_mb": peak_mb, "mem_kind": mem_kind,
                "lr": scheduler.get_last_lr()[0], "step": epoch * steps_per_epoch,
            }
            history.append(record)
            metrics.append(record)
            tb.log_epoch(record)
            view.add_row(record)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})

            state = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss, "classes": images.classes,
                     "config": cfg.model_dump(mode="json")}
            unwrapped = accelerator.unwrap_model(model)
            save_checkpoint(run_dir / "checkpoints" / "last", unwrapped, state)
            if val_acc > best_acc:
                best_acc = val_acc
                save_checkpoint(run_dir / "checkpoints" / "best", unwrapped, state)

    # ---- summary
    summary = summarize(history, cfg, accelerator, trainable, total)
    # Per-class numbers and the confusion matrix of the best checkpoint, for reports; before
    # summary.json, whose presence says the run finished.
    save_eval(run_dir / EVAL_FILE, evaluate_checkpoint(run_dir / "checkpoints" / "best", val_loader, accelerator))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("best val_acc %.4f at epoch %d; summary in %s", summary["best_val_acc"], summary["best_epoch"],
             run_dir / "summary.json")
    return summary


def train_one_epoch(model, loader, optimizer, scheduler, accelerator: Accelerator, cfg: TrainConfig,
                    view: EpochView, tb: TensorBoardLog) -> tuple[float, float, float, int]:
    """One pass over `loader`; returns (mean loss, accuracy, seconds, images seen)."""
    model.train()
    running = RunningMetrics(accelerator.device)
    start = time.perf_counter()
    for pixels, labels in loader:
        with accelerator.accumulate(model):
            logits = model(pixels)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        running.update(loss, logits, labels)
        tb.log_step(loss, scheduler.get_last_lr()[0], accelerator.sync_gradients)
        view.advance()
    loss, acc = running.compute()  # the epoch's only host sync: all queued GPU work is done after it
    return loss, acc, time.perf_counter() - start, running.count


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `loader`, each sample counted once across processes."""
    model.eval()
    running = RunningMetrics(accelerator.device)
    for pixels, labels in loader:
        logits = model(pixels)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        running.update(F.cross_entropy(logits.float(), labels), logits, labels)
    return running.compute()


# ----------------------------------------------------------------------------- components


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for the configured device and precision; impossible combinations are user errors."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise UserError("train.device: 'cuda' was asked for but no CUDA device is available")
    on_gpu = has_cuda and cfg.device != "cpu"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_gpu:
        raise UserError("train.precision: fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=cfg.accum_steps,
        # Data order becomes a function of (seed, epoch): reproducible, and the same on every process count.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def make_loaders(cfg: Config, images: ImageSet, split: Split, model: ImageClassifier) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over the split, with the backbone's own preprocessing."""
    pre = model.backbone.preprocess
    if len(split.train) < cfg.train.micro_batch:
        raise UserError(f"train.micro_batch: {cfg.train.micro_batch} is larger than the training split "
                        f"({len(split.train)} images)")
    train_set = TransformedImages(images.subset(split.train), train_transform(pre, cfg.data))
    val_set = TransformedImages(images.subset(split.val), eval_transform(pre))
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    train = DataLoader(train_set, batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.train.seed), **workers)
    val = DataLoader(val_set, batch_size=cfg.train.eval_batch, shuffle=False, **workers)
    return train, val


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases, norm weights, CLS and probe tokens and
    position embeddings are not pulled toward zero."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or "position_embedding" in name or name.endswith(("class_embedding", "probe"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def summarize(history: list[dict[str, Any]], cfg: Config, accelerator: Accelerator,
              trainable: int, total: int) -> dict[str, Any]:
    """The run in one record: best and final accuracy, speed, memory, size, and where it ran."""
    import accelerate
    import transformers

    best = max(history, key=lambda r: r["val_acc"])  # first of equals: the earliest epoch wins ties
    return {
        "name": cfg.name,
        "backbone": cfg.model.backbone,
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "final_val_acc": history[-1]["val_acc"],
        "epochs": len(history),
        "mean_epoch_time_s": float(np.mean([r["epoch_time_s"] for r in history])),
        "total_train_time_s": float(np.sum([r["epoch_time_s"] for r in history])),
        "train_images_per_s": float(np.mean([r["train_images_per_s"] for r in history])),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in history),
        "mem_kind": history[-1]["mem_kind"],
        "trainable_params": trainable,
        "total_params": total,
        "effective_batch": cfg.train.micro_batch * cfg.train.accum_steps * accelerator.num_processes,
        "precision": accelerator.mixed_precision,
        "device": device_name(accelerator.device),
        "versions": {"vlfit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "python": platform.python_version()},
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

