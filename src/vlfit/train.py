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
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vlfit import __version__
from vlfit.checkpoint import save_checkpoint
from vlfit.config import Config, TrainConfig
from vlfit.console import EpochView, log_to_file
from vlfit.data import ImageSet, Split, eval_transform, load_source, stratified_split, train_transform
from vlfit.data.cache import cache_side, open_cache
from vlfit.data.gpu_transforms import CachedImages, EvalResize, TrainAugment, batches_as_is, on_device
from vlfit.data.sources import TransformedImages
from vlfit.errors import UserError
from vlfit.metrics import MetricsLog, RunningMetrics, peak_memory_mb, reset_peak_memory
from vlfit.models import ImageClassifier, Preprocess
from vlfit.probe import feature_loaders
from vlfit.task import build_classifier, build_task
from vlfit.wiseft import interpolate, snapshot

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

    classifier, text = build_classifier(cfg, images.classes)
    zero_shot = snapshot(classifier) if cfg.wise_ft.alphas else None
    probe = cfg.model.finetune == "linear_probe"
    if probe:
        train_loader, val_loader = feature_loaders(cfg, classifier, images, split, accelerator)
    else:
        train_loader, val_loader = make_loaders(cfg, images, split, classifier.backbone.preprocess)
    model = build_task(cfg, classifier, text, images.classes, cached_features=probe)
    speed_options(classifier, cfg.train)
    trainable, total = model.parameter_counts()
    optimizer = make_optimizer(model, cfg.train, fused=has_fused_adamw(accelerator.device))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    train_loader, val_loader = on_device(train_loader), on_device(val_loader)  # cached pipeline: augment on device
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
    with EpochView(enabled=show) as view:
        for epoch in range(1, cfg.train.epochs + 1):
            reset_peak_memory(accelerator.device)
            view.start_epoch(epoch, cfg.train.epochs, len(train_loader))
            train_loss, train_acc, train_time, n_seen = train_one_epoch(
                model, train_loader, optimizer, scheduler, accelerator, cfg.train, view, total_steps)
            val_loss, val_acc = evaluate(model, val_loader, accelerator)
            peak_mb, mem_kind = peak_memory_mb(accelerator.device)
            record = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                "val_loss": val_loss, "val_acc": val_acc, "epoch_time_s": train_time,
                "train_images_per_s": n_seen / train_time, "peak_mem_mb": peak_mb, "mem_kind": mem_kind,
                "lr": scheduler.get_last_lr()[0], "step": epoch * steps_per_epoch,
                **accelerator.unwrap_model(model).epoch_stats(),
            }
            history.append(record)
            metrics.append(record)
            view.add_row(record)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})

            state = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss, "classes": images.classes,
                     "config": cfg.model_dump(mode="json")}
            unwrapped = accelerator.unwrap_model(model).classifier
            save_checkpoint(run_dir / "checkpoints" / "last", unwrapped, state)
            if val_acc > best_acc:
                best_acc = val_acc
                save_checkpoint(run_dir / "checkpoints" / "best", unwrapped, state)

    # ---- WiSE-FT: the fine-tuned weights mixed back toward the zero-shot model
    if zero_shot is not None:
        wise = wise_ft_sweep(model, zero_shot, cfg.wise_ft.alphas, val_loader, accelerator)
        (run_dir / "wise_ft.json").write_text(json.dumps(wise, indent=1) + "\n")

    # ---- summary
    summary = summarize(history, cfg, accelerator, trainable, total)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("best val_acc %.4f at epoch %d; summary in %s", summary["best_val_acc"], summary["best_epoch"],
             run_dir / "summary.json")
    return summary


def train_one_epoch(model, loader, optimizer, scheduler, accelerator: Accelerator, cfg: TrainConfig,
                    view: EpochView, total_steps: int) -> tuple[float, float, float, int]:
    """One pass over `loader`; returns (mean loss, accuracy, seconds, images seen)."""
    model.train()
    task = accelerator.unwrap_model(model)
    running = RunningMetrics(accelerator.device)
    start = time.perf_counter()
    for pixels, labels in loader:
        with accelerator.accumulate(model):
            out = model(pixels, labels)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and cfg.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
                task.after_optimizer_step(scheduler.last_epoch / total_steps)
            optimizer.zero_grad(set_to_none=True)
        running.update(out["loss"], out["logits"], labels)
        view.advance()
    loss, acc = running.compute()  # the epoch's only host sync: all queued GPU work is done after it
    return loss, acc, time.perf_counter() - start, running.count


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `loader`, each sample counted once across processes."""
    model.eval()
    running = RunningMetrics(accelerator.device)
    for pixels, labels in loader:
        logits = model(pixels, labels)["logits"]
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
        # non_blocking: copies from pinned loader memory overlap with compute instead of waiting for it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
    )


def make_loaders(cfg: Config, images: ImageSet, split: Split, pre: Preprocess) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over the split, with the backbone's own preprocessing."""
    if len(split.train) < cfg.train.micro_batch:
        raise UserError(f"train.micro_batch: {cfg.train.micro_batch} is larger than the training split "
                        f"({len(split.train)} images)")
    return make_loader(cfg, images, split.train, pre, train=True), make_loader(cfg, images, split.val, pre, train=False)


def make_loader(cfg: Config, images: ImageSet, index: np.ndarray, pre: Preprocess, train: bool) -> DataLoader:
    """A loader over images[index]: shuffled, whole batches, augmented for training; in order with the
    evaluation transform otherwise.

    With `data.pipeline: cached`, batches hold cached uint8 pixels: pass the prepared loader through
    `on_device` to crop, flip and normalise them on the device.
    """
    if cfg.data.pipeline == "cached":
        with PartialState().main_process_first():  # one process decodes; the others then find its entry
            cache = open_cache(images, cache_side(pre.image_size, cfg.data.cache_size), pre.interpolation,
                               cfg.data.cache_dir)
        transform = (TrainAugment(pre, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip, cfg.train.seed)
                     if train else EvalResize(pre))
        dataset = CachedImages(cache, index, images.labels[index], transform)
        batching = dict(collate_fn=batches_as_is)
    else:
        transform = train_transform(pre, cfg.data) if train else eval_transform(pre)
        dataset = TransformedImages(images.subset(index), transform)
        batching = {}
    options = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu", **batching)
    if train:
        return DataLoader(dataset, batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg.train.seed), **options)
    return DataLoader(dataset, batch_size=cfg.train.eval_batch, shuffle=False, **options)


def speed_options(classifier: ImageClassifier, cfg: TrainConfig) -> None:
    """Gradient checkpointing and torch.compile of the backbone, where nearly all the compute is.

    Applied after the task is built, so a masking teacher (a copy) stays eager. `Module.compile`
    compiles in place: parameter names, and so checkpoints, are unchanged.
    """
    if cfg.grad_checkpointing:
        classifier.backbone.set_grad_checkpointing(True)
    if cfg.compile:
        classifier.backbone.compile()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by (layer, decay).

    Weight decay applies to weight matrices only: biases, norm weights, CLS and probe tokens and
    position embeddings are not pulled toward zero. With `layer_decay` < 1, encoder layer i of L
    gets lr * layer_decay**(L + 1 - i): the embeddings move least, the head at the full rate.
    """
    num_layers = len(model.classifier.backbone.encoder_layers)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "position_embedding" in name or name.endswith(("class_embedding", "probe"))
        layer = layer_id(name, num_layers)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": cfg.lr * cfg.layer_decay ** (num_layers + 1 - layer)})
        group["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for `device`: CUDA, and CPUs from torch 2.4."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def layer_id(name: str, num_layers: int) -> int:
    """0 for the vision embeddings, i + 1 for encoder layer i, num_layers + 1 for everything after."""
    if ".tower.embeddings." in name or ".tower.pre_layrnorm." in name:
        return 0
    match = re.search(r"\.tower\.encoder\.layers\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else num_layers + 1


@torch.inference_mode()
def wise_ft_sweep(model, zero_shot: dict[str, torch.Tensor], alphas: list[float], val_loader,
                  accelerator: Accelerator) -> list[dict[str, float]]:
    """Validation loss and accuracy of (1 - a) * zero-shot + a * fine-tuned, for each a; weights restored after."""
    classifier = accelerator.unwrap_model(model).classifier
    fine_tuned = snapshot(classifier)
    results = []
    for alpha in alphas:
        classifier.load_state_dict(interpolate(zero_shot, fine_tuned, alpha))
        val_loss, val_acc = evaluate(model, val_loader, accelerator)
        results.append({"alpha": alpha, "val_loss": val_loss, "val_acc": val_acc})
        log.info("WiSE-FT alpha %.2f: val_acc %.4f", alpha, val_acc)
    classifier.load_state_dict(fine_tuned)
    return results


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

