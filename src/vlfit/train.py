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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # transformers 4.56 has it only here

from vlfit import __version__
from vlfit.checkpoint import Checkpoints, read_checkpoint, restore_parts
from vlfit.config import Config, TrainConfig, load_config, resume_differences
from vlfit.console import EpochView, log_to_file
from vlfit.data import prepare_data
from vlfit.data.gpu_transforms import on_device
from vlfit.data.loaders import make_loader, make_loaders
from vlfit.distributed import AnyProcess, FullState, PerProcess, across_processes, main_decides, process_index, together
from vlfit.errors import ConfigError, UserError
from vlfit.evaluate import EVAL_FILE, evaluate_checkpoint, save_eval
from vlfit.metrics import MetricsLog, RunningMetrics, TensorBoardLog, peak_memory_mb, reset_peak_memory
from vlfit.models import ImageClassifier
from vlfit.probe import feature_loaders
from vlfit.report.runs import write_mask_examples
from vlfit.resilience import GracefulStop, NonFiniteGuard, Safeguards, explain_oom, resolve_micro_batch
from vlfit.resume import Progress, RNGState, epoch_batches, rng_untouched
from vlfit.task import build_classifier, build_task
from vlfit.wiseft import interpolate, snapshot

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: Path, show: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return the run's summary.

    A new run needs `run_dir` to exist and be empty. With `resume`, `run_dir` holds a run of the
    same config, which continues from its newest good checkpoint (from the start if it has none)
    and finishes with exactly the metrics and weights it would have had without the interruption.
    """
    if resume:
        cfg = check_resumable(cfg, run_dir)
    with log_to_file(run_dir / "train.log") if process_index() == 0 else nullcontext():  # one log, the main process's
        return _train(cfg.model_copy(deep=True), run_dir, show, resume)


def _train(cfg: Config, run_dir: Path, show: bool, resume: bool) -> dict[str, Any]:
    # ---- setup
    accelerator = make_accelerator(cfg.train)
    main = accelerator.is_main_process  # the one process that writes files; every process computes alike
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg.train.checkpoint_every, main)
    start_from = main_decides(resume_point, checkpoints, accelerator.num_processes) if resume else None
    set_seed(cfg.train.seed)
    if main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # Every process checks every image and draws the same split; the main one writes split.json,
    # classes.txt and the reports.
    images, split = together(prepare_data, cfg.data, run_dir if main else None)

    classifier, text = build_classifier(cfg, images.classes)
    zero_shot = snapshot(classifier) if cfg.wise_ft.alphas else None
    recorded = (start_from[1]["meta"]["micro_batch"], start_from[1]["meta"]["accum_steps"]) if start_from else None
    cfg.train = resolve_micro_batch(cfg.train, classifier, accelerator, recorded)
    accelerator.gradient_accumulation_steps = cfg.train.accum_steps
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
    val_loader = on_device(val_loader)  # the cached pipeline resizes and normalises on the device
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

    # ---- state: everything a checkpoint holds, by name. A new stateful part (an EMA teacher, ...)
    # is one more entry; it needs only state_dict() and load_state_dict().
    progress = Progress(RunningMetrics(accelerator.device))
    guard = NonFiniteGuard(cfg.train.nonfinite_patience, scaler=accelerator.scaler is not None,
                           combine=accelerator.reduce if accelerator.num_processes > 1 else None)
    task = accelerator.unwrap_model(model)
    parts: dict[str, Any] = {"model": task.classifier, "optimizer": optimizer,
                             "scheduler": scheduler, "progress": progress, "nonfinite": guard}
    if cfg.train.distributed == "fsdp":  # sharded weights and moments, saved and restored as full tensors
        parts.update(model=FullState(task.classifier), optimizer=FullState(model, optimizer.optimizer))
    parts.update(task.extra_state())  # an EMA teacher, a text tower that trains
    if accelerator.scaler is not None:
        parts["scaler"] = accelerator.scaler
    parts["running"] = PerProcess(progress.running)  # each process's loss/accuracy sums of the epoch so far
    parts["rng"] = PerProcess(RNGState())  # last: restoring it must follow everything else that draws random numbers
    if start_from is not None:
        restore_parts(parts, *read_checkpoint(start_from[0]))
        accelerator.wait_for_everyone()  # every process has read it before the main one writes the next
        log.info("resumed from %s: epoch %d, %d batches into it, step %d", start_from[0], progress.epoch,
                 progress.batches_done, progress.step)
    metrics = MetricsLog(run_dir / "metrics.jsonl", writer=main)
    metrics.rewrite(progress.history)  # drops lines written after the checkpoint the run resumed from
    meta = {"classes": images.classes, "config": cfg.model_dump(mode="json"), "micro_batch": cfg.train.micro_batch,
            "accum_steps": cfg.train.accum_steps, "num_processes": accelerator.num_processes,
            "architecture": parts["model"].architecture()}

    # ---- loop
    tensorboard = TensorBoardLog(run_dir, main, step=progress.step)
    with GracefulStop(agree=AnyProcess()) as stop, EpochView(enabled=show and main) as view, tensorboard as tb:
        safeguards = Safeguards(checkpoints, parts, meta, guard, stop, run_dir)
        for epoch in range(progress.epoch, cfg.train.epochs + 1):
            reset_peak_memory(accelerator.device)
            task.start_epoch(epoch)  # its phase: masked, or FLIP's unmasked final epochs
            view.start_epoch(epoch, cfg.train.epochs, len(train_loader), done=progress.batches_done)
            batches = on_device(epoch_batches(accelerator, train_loader, epoch, skip=progress.batches_done))
            with explain_oom(cfg.train, "training"):
                train_loss, train_acc = train_one_epoch(model, batches, optimizer, scheduler, accelerator,
                                                        cfg.train, progress, view, safeguards, tb, total_steps)
            with explain_oom(cfg.train, "evaluation"):
                val_loss, val_acc = evaluate(model, val_loader, accelerator)
            peak_mb, mem_kind = peak_memory_mb(accelerator.device)
            speeds, peaks = zip(*across_processes([progress.running.count / progress.epoch_seconds, peak_mb]))
            record = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                "val_loss": val_loss, "val_acc": val_acc, "epoch_time_s": progress.epoch_seconds,
                "train_images_per_s": sum(speeds), "train_images_per_s_per_process": list(speeds),
                "peak_mem_mb": max(peaks), "peak_mem_mb_per_process": list(peaks),
                "mem_kind": mem_kind, "lr": scheduler.get_last_lr()[0], "step": progress.step,
                "skipped_steps": guard.skipped, **task.epoch_stats(),
            }
            best = val_acc > max((r["val_acc"] for r in progress.history), default=-1.0)
            progress.finish_epoch(record)
            safeguards.save(progress, best=best)
            metrics.append(record)
            tb.log_epoch(record)
            view.add_row(record)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})
            stop.agree()
            stop.raise_if_requested(run_dir, f"after epoch {epoch}")

    # ---- WiSE-FT: the fine-tuned weights mixed back toward the zero-shot model
    if zero_shot is not None:
        wise = wise_ft_sweep(model, zero_shot, cfg.wise_ft.alphas, val_loader, accelerator)
        if main:
            (run_dir / "wise_ft.json").write_text(json.dumps(wise, indent=1) + "\n")

    # ---- summary
    summary = summarize(progress.history, cfg, accelerator, trainable, total)
    # Per-class numbers and the confusion matrix of the best checkpoint, for reports; before
    # summary.json, whose presence says the run finished.
    pixel_loader = on_device(accelerator.prepare(make_loader(cfg, images, split.val, classifier.backbone.preprocess,
                                                             train=False))) if probe else val_loader
    accelerator.wait_for_everyone()  # the main process has written `best`: now every process may read it
    scores = evaluate_checkpoint(checkpoints.root / "best", pixel_loader, accelerator)
    # What the masking keeps, for the report; on every process, as building a loader waits for all.
    examples = mask_examples(task, cfg, images, split.val, accelerator.device) if task.masker is not None else None
    if main:
        save_eval(run_dir / EVAL_FILE, scores)
        if examples is not None:
            write_mask_examples(run_dir, *examples)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("best val_acc %.4f at epoch %d; summary in %s", summary["best_val_acc"], summary["best_epoch"],
             run_dir / "summary.json")
    return summary


def train_one_epoch(model, batches, optimizer, scheduler, accelerator: Accelerator, cfg: TrainConfig,
                    progress: Progress, view: EpochView, safeguards: Safeguards, tb: TensorBoardLog,
                    total_steps: int) -> tuple[float, float]:
    """Train on `batches`, the rest of epoch `progress.epoch`, keeping `progress` current; between
    optimizer steps `safeguards` check the loss, checkpoint when due and stop on a signal.
    Returns the epoch's (mean loss, accuracy), counting any part done before a resume."""
    model.train()
    task = accelerator.unwrap_model(model)
    clock = time.perf_counter() - progress.epoch_seconds  # seconds spent writing checkpoints do not count
    for pixels, labels in batches:
        grad_norm = None
        with accelerator.accumulate(model):
            out = model(pixels, labels)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and cfg.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
                task.after_optimizer_step(scheduler.last_epoch / total_steps)
            optimizer.zero_grad(set_to_none=True)
        progress.running.update(out["loss"], out["logits"], labels)
        progress.batches_done += 1
        safeguards.observe(out["loss"], grad_norm)
        tb.log_step(out["loss"], scheduler.get_last_lr()[0], accelerator.sync_gradients)
        view.advance()
        if accelerator.sync_gradients:
            progress.step += 1
            progress.epoch_seconds = time.perf_counter() - clock
            clock += safeguards.after_step(progress, skipped=accelerator.optimizer_step_was_skipped,
                                           epoch_ends=accelerator.gradient_state.end_of_dataloader)
    # The epoch's only wait for the device (all its work is done), over every process's images.
    loss, acc = progress.running.compute(accelerator.reduce)
    progress.epoch_seconds = time.perf_counter() - clock
    return loss, acc


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `loader`, each sample counted once across processes.

    Leaves the global random streams as they were (a loader may draw its worker seed from them), so
    evaluating never changes the training that follows, and a resumed run evaluates like the original."""
    model.eval()
    running = RunningMetrics(accelerator.device)
    with rng_untouched(accelerator.device):
        for pixels, labels in loader:
            logits = model(pixels, labels)["logits"]
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            running.update(F.cross_entropy(logits.float(), labels), logits, labels)
    return running.compute()


# ----------------------------------------------------------------------------- components


def check_resumable(cfg: Config, run_dir: Path) -> Config:
    """The config a resume of `run_dir` runs with: the run's own, with only the settings that cannot
    change its results (RESUME_MAY_CHANGE) taken from `cfg`. Any other difference is a ConfigError."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume: {run_dir} is not a vlfit run directory (no config.yaml)")
    saved = load_config(run_dir / "config.yaml")
    differences = resume_differences(saved, cfg)
    if differences:
        raise ConfigError([*differences, "a resumed run must keep its settings: resume without CONFIG, "
                                         "or start a new run (another --run-dir)"], f"--resume {run_dir}")
    how = {"num_workers": cfg.data.num_workers, "cache_dir": cfg.data.cache_dir}
    return saved.model_copy(update={"data": saved.data.model_copy(update=how)})


def resume_point(checkpoints: Checkpoints, num_processes: int) -> tuple[Path, dict[str, Any]] | None:
    """The newest good checkpoint to resume from, if it was written by as many processes as this run has.

    Each process restores its own random streams and running sums, so the count must match."""
    found = checkpoints.newest_good()
    if found is not None and (had := found[1]["meta"].get("num_processes", 1)) != num_processes:
        raise UserError(f"--resume: this run was trained by {had} processes and would be resumed by "
                        f"{num_processes}; resume it with {had} (e.g. accelerate launch --num_processes {had} ...), "
                        "or start a new run")
    return found


def uses_gpu(cfg: TrainConfig) -> bool:
    """Whether the run trains on CUDA GPUs; asking for one that is not there is a user error."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise UserError("train.device: 'cuda' was asked for but no CUDA device is available")
    return has_cuda and cfg.device != "cpu"


def mask_examples(task, cfg: Config, images, val: np.ndarray, device: torch.device,
                  n: int = 6) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `n` validation images as the model sees them ((n, H, W, 3) uint8), the patches its
    masking keeps of them under the final weights and teacher ((n, grid, grid) bool), and their classes."""
    pre = task.classifier.backbone.preprocess
    loader = make_loader(cfg, images, val[:n], pre, train=False)
    pixels, labels = next(iter(on_device(loader, device)))
    pixels = pixels.to(device)
    with rng_untouched(device):
        keep = task.keep_grid(pixels)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    shown = ((pixels.float() * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    return shown.cpu().numpy(), keep.cpu().numpy(), [images.classes[i] for i in labels.tolist()]


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for the configured device, precision and distribution; impossible combinations
    are user errors. Under `accelerate launch` or `torchrun` it joins the launched processes."""
    on_gpu = uses_gpu(cfg)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_gpu:
        raise UserError("train.precision: fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    if cfg.distributed == "fsdp" and not on_gpu:
        raise UserError("train.distributed: fsdp shards the model over CUDA GPUs; on the CPU use ddp")
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=cfg.accum_steps,
        # Data order becomes a function of (seed, epoch): reproducible, and the same on every process count.
        # non_blocking: copies from pinned loader memory overlap with compute instead of waiting for it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
        fsdp_plugin=fsdp_plugin() if cfg.distributed == "fsdp" else None,
    )


def fsdp_plugin():
    """FSDP2: every encoder layer its own shard unit, parameters kept as they are (so the optimizer's
    per-layer groups survive), and full weights gathered to the CPU for checkpoints."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["CLIPEncoderLayer", "SiglipEncoderLayer"],
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True, cpu_ram_efficient_loading=False,
    )


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
        "micro_batch": cfg.train.micro_batch,
        "accum_steps": cfg.train.accum_steps,
        "num_processes": accelerator.num_processes,
        "skipped_steps": history[-1]["skipped_steps"],
        "precision": accelerator.mixed_precision,
        "device": device_name(accelerator.device),
        "versions": {"vlfit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "python": platform.python_version()},
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

