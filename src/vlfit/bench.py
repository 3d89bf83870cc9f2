"""`vlfit bench`: how fast vlfit trains, measured next to the Hugging Face Trainer on the same model and data.

Three measurements, each in a fresh process (so one side's memory, threads and compiled code never
reach the other's numbers):

1. vlfit: the device's matrix-multiply rate in the training precision (bf16 on GPUs that have it);
   one training epoch end to end on a generated JPEG dataset of HAR-like images through vlfit's own
   components (`make_loaders`, `train_one_epoch`), with the image-cache build timed apart; then the
   training step alone on random tensors already on the device, its model FLOPs counted with
   `torch.utils.flop_counter` (forward + backward, no recomputation) and set against that rate.
2. and 3. the Hugging Face `Trainer` on `CLIPForImageClassification` / `SiglipForImageClassification`
   of the same architecture, fed by `datasets` with torchvision transforms as Hugging Face's
   image-classification guide sets it up, with the Trainer's default of no loader workers and with
   one worker per core.

Every side runs `epochs` epochs and reports the last one (workers started, caches warm, code
compiled), so the numbers are what a long run sees per epoch.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlfit.errors import UserError

DATASET_VERSION = 1
QUICK = dict(images=128, batch=32, epochs=2, steps=5, warmup=2)


@dataclass
class BenchOptions:
    backbone: str = "tiny-clip"  # preset, hub id or local directory, as model.backbone
    batch: int = 128  # images per training step, both sides
    images: int = 10080  # JPEGs in the generated dataset (one HAR training split: 10,080)
    epochs: int = 2  # epochs per end-to-end measurement; the last one is reported
    steps: int = 30  # timed steps of the random-tensor step benchmark
    warmup: int = 10  # untimed steps before them
    overrides: list[str] = field(default_factory=list)  # vlfit config overrides (`--set`), e.g. train.compile=true
    trainer: bool = True  # also run the Hugging Face Trainer peer
    data_dir: str | None = None  # keep the generated JPEGs here and reuse them (default: a temporary directory)
    workers: int = field(default_factory=lambda: _cores())  # loader workers of the Trainer's second setting
    repeat: int = 1  # rounds of all measurements, interleaved; the median of each is reported


def run_bench(opts: BenchOptions, command: str = "vlfit bench", show: bool = True) -> dict[str, Any]:
    """Run every measurement and return the record `vlfit bench` writes as JSON (`command`: how it was run)."""
    from vlfit.config import load_config

    cfg = load_config(None, [f"model.backbone={opts.backbone}", f"train.micro_batch={opts.batch}", *opts.overrides])
    if opts.images < opts.batch:
        raise UserError(f"--images ({opts.images}) must be at least --batch ({opts.batch})")
    load_before = _load_average()
    work = Path(tempfile.mkdtemp(prefix="vlfit-bench-"))
    vlfit_runs: list[dict[str, Any]] = []
    trainer_runs: dict[int, list[dict[str, Any]]] = {w: [] for w in sorted({0, opts.workers})} if opts.trainer else {}
    try:
        data_dir = Path(opts.data_dir) if opts.data_dir else work / "jpegs"
        dataset = make_jpeg_dataset(data_dir, opts.images, show=show)
        model_dir = _isolated(_hf_model_dir, opts.backbone, str(work / "hf-model")) if opts.trainer else None
        # Rounds interleave the sides, so a drift in what else the machine runs reaches all of them alike.
        for r in range(opts.repeat):
            vlfit_runs.append(_isolated(_vlfit_side, cfg.model_dump(mode="json"), str(data_dir),
                                        str(work / f"cache-{r}"), opts))
            for workers, runs in trainer_runs.items():
                runs.append(_isolated(_trainer_side, model_dir, str(data_dir), workers, vlfit_runs[0]["precision"],
                                      vlfit_runs[0]["device_type"], opts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vlfit = dict(_median(vlfit_runs, lambda r: r["images_per_s"]))
    step_run = _median(vlfit_runs, lambda r: r["step"]["images_per_s"])  # with the matmul rate of its own run
    trainers = [_median(runs, lambda r: r["images_per_s"]) for runs in trainer_runs.values()]
    faster = max(trainers, key=lambda t: t["images_per_s"]) if trainers else None
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "device": vlfit.pop("device"),
        # What else ran meanwhile: on a shared machine, CPU numbers move with it.
        "cpu": {"cores": _cores(), "processor": platform.processor() or platform.machine(),
                "load_average_before_after": [load_before, _load_average()]},
        "versions": vlfit.pop("versions"),
        "settings": {**asdict(opts), "precision": vlfit["precision"], "pipeline": cfg.data.pipeline,
                     "input_size": vlfit["input_size"]},
        "dataset": dataset,
        "matmul": step_run["matmul"],
        "step": step_run["step"],
        "vlfit": {k: v for k, v in vlfit.items() if k not in ("step", "matmul")},
        "trainer": trainers,
        "speedup_vs_faster_trainer": vlfit["images_per_s"] / faster["images_per_s"] if faster else None,
        "rounds": {"vlfit_images_per_s": [v["images_per_s"] for v in vlfit_runs],
                   "step_images_per_s": [v["step"]["images_per_s"] for v in vlfit_runs],
                   **{f"trainer_{w}_workers_images_per_s": [t["images_per_s"] for t in runs]
                      for w, runs in trainer_runs.items()}},
    }


def _median(runs: list[dict[str, Any]], key) -> dict[str, Any]:
    """The run whose key(run) is the median (the lower middle one for an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


# ----------------------------------------------------------------------------- the generated dataset


def make_jpeg_dataset(path: Path, n: int, seed: int = 0, show: bool = True) -> dict[str, Any]:
    """n JPEGs like HAR's: synthetic-har scenes at 200-480 px on the long side, HAR's aspect ratios,
    about 18 kB each; labels in labels.json. Reused when `path` already holds the same set."""
    manifest = path / "labels.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        if record.get("version") == DATASET_VERSION and record.get("n") == n and record.get("seed") == seed:
            return record["stats"]
    path.mkdir(parents=True, exist_ok=True)
    chunks = [(path, start, min(start + 256, n), seed) for start in range(0, n, 256)]
    from rich.progress import Progress

    import vlfit.data.synthetic  # noqa: F401 - imported once here, not once per forked worker

    with Progress(disable=not show) as progress, multiprocessing.get_context("fork").Pool(_cores()) as pool:
        task = progress.add_task(f"writing {n} JPEGs", total=n)
        parts = []
        for part in pool.imap(_write_chunk, chunks):
            parts.append(part)
            progress.advance(task, len(part))
    files = [f for part in parts for f in part]
    kb = np.array([f["bytes"] for f in files]) / 1000
    sides = np.array([(f["h"], f["w"]) for f in files])
    stats = {"images": n, "mean_kb": float(kb.mean()), "min_side": int(sides.min()), "max_side": int(sides.max()),
             "mean_hw": [float(v) for v in sides.mean(0)]}
    manifest.write_text(json.dumps({"version": DATASET_VERSION, "n": n, "seed": seed, "stats": stats,
                                    "files": [f["name"] for f in files], "labels": [f["label"] for f in files]}))
    return stats


def _write_chunk(args: tuple[Path, int, int, int]) -> list[dict[str, Any]]:
    from PIL import Image

    from vlfit.data.synthetic import make_synthetic_har

    path, start, stop, seed = args
    rng = np.random.default_rng([seed, start])
    drawings, labels = make_synthetic_har(stop - start, 128, seed=seed * 100003 + start)
    out = []
    for i, (drawing, label) in enumerate(zip(drawings, labels), start):
        long_side = int(rng.integers(200, 481))
        aspect = float(rng.choice([3 / 4, 2 / 3, 1.0, 4 / 3, 3 / 2]))  # width / height
        w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        pixels = np.asarray(Image.fromarray(drawing).resize((w, h), Image.BICUBIC), dtype=np.float32)
        # Upsampled drawings are smoother than photos; sensor-like noise brings the files to HAR's ~18 kB.
        pixels += rng.normal(0.0, 6.0, pixels.shape)
        name = f"{i:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path / name, quality=85)
        out.append({"name": name, "label": int(label), "bytes": (path / name).stat().st_size, "h": h, "w": w})
    return out


class JpegFiles:
    """Images decoded from their files each time they are read, as a folder-backed ImageSet holds them.

    Items are array-likes that decode when NumPy asks for the array: `ImageSet.subset` lists its items
    up front, and the torchvision pipeline must still decode every image in every epoch, as it does on
    a lazy source.
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Jpeg:
        return _Jpeg(self.paths[i])


class _Jpeg:
    def __init__(self, path: Path):
        self.path = path

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path) as im:
            pixels = np.array(im.convert("RGB"))
        return pixels if dtype is None else pixels.astype(dtype)


def _jpeg_image_set(data_dir: Path):
    from vlfit.data import ImageSet
    from vlfit.data.synthetic import HAR_CLASSES

    record = json.loads((data_dir / "labels.json").read_text())
    paths = [data_dir / name for name in record["files"]]
    # Ids carry size and modification time, so regenerated files never meet a stale cache entry.
    ids = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]
    return ImageSet(JpegFiles(paths), np.array(record["labels"], dtype=np.int64), list(HAR_CLASSES), ids)


# ----------------------------------------------------------------------------- vlfit


def _vlfit_side(cfg_dict: dict[str, Any], data_dir: str, cache_dir: str, opts: BenchOptions) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed

    from vlfit.checkpoint import Checkpoints
    from vlfit.config import Config
    from vlfit.console import EpochView
    from vlfit.data.loaders import make_loaders
    from vlfit.data.gpu_transforms import on_device
    from vlfit.data.split import Split
    from vlfit.metrics import RunningMetrics, TensorBoardLog, peak_memory_mb, reset_peak_memory
    from vlfit.resilience import GracefulStop, NonFiniteGuard, Safeguards
    from vlfit.resume import Progress, epoch_batches
    from vlfit.task import build_classifier, build_task
    from vlfit.train import (
        device_name,
        has_fused_adamw,
        make_accelerator,
        make_optimizer,
        speed_options,
        train_one_epoch,
    )

    _quiet_transformers()
    cfg = Config.model_validate(cfg_dict)
    cfg.data.cache_dir = cache_dir
    accelerator = make_accelerator(cfg.train)
    device = accelerator.device
    set_seed(cfg.train.seed)
    images = _jpeg_image_set(Path(data_dir))
    classifier, text = build_classifier(cfg, images.classes)
    task = build_task(cfg, classifier, text, images.classes).to(device)
    pre = classifier.backbone.preprocess
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    # Model FLOPs of one step, counted eagerly before compile or checkpointing can change what runs.
    x = torch.randn(opts.batch, 3, pre.image_size, pre.image_size, device=device)
    y = torch.randint(0, len(images.classes), (opts.batch,), device=device)
    flops = count_train_flops(task, x, y, accelerator)
    speed_options(classifier, cfg.train)
    optimizer = make_optimizer(task, cfg.train, fused=has_fused_adamw(device))
    matmul = matmul_rate(device, dtype)

    # (b) one epoch end to end: the loader reads the JPEGs (through the cache when the pipeline is cached).
    split = Split(train=np.arange(len(images)), val=np.arange(0))
    start = time.perf_counter()
    train_loader, _ = make_loaders(cfg, images, split, pre)
    prepare_s = time.perf_counter() - start
    model, optimizer, train_loader = accelerator.prepare(task, optimizer, train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def epoch(batches) -> tuple[float, int]:
        """(seconds, images) of one pass of the real training loop, its per-step safeguards included."""
        progress = Progress(RunningMetrics(device))
        guard = NonFiniteGuard(cfg.train.nonfinite_patience, scaler=accelerator.scaler is not None)
        safeguards = Safeguards(Checkpoints(Path(cache_dir) / "checkpoints"), {}, {}, guard, GracefulStop(), None)
        tb = TensorBoardLog(Path(cache_dir), enabled=False)
        train_one_epoch(model, batches, optimizer, scheduler, accelerator, cfg.train, progress,
                        EpochView(enabled=False), safeguards, tb, 10**9)
        return progress.epoch_seconds, progress.running.count

    reset_peak_memory(device)
    epochs = [epoch(on_device(epoch_batches(accelerator, train_loader, e))) for e in range(1, opts.epochs + 1)]
    e2e_mem, mem_kind = peak_memory_mb(device)

    # (a) the step alone, on tensors already on the device.
    reset_peak_memory(device)
    epoch([(x, y)] * opts.warmup)
    seconds, seen = epoch([(x, y)] * opts.steps)
    step_mem, _ = peak_memory_mb(device)
    step_rate = seen / seconds
    last = epochs[-1]
    return {
        "device": device_name(device), "device_type": device.type, "versions": _versions(),
        "precision": accelerator.mixed_precision, "input_size": pre.image_size,
        "matmul": {"dtype": str(dtype).removeprefix("torch."), "tflops": matmul / 1e12},
        "step": {"images_per_s": step_rate, "gflop_per_image": flops / opts.batch / 1e9,
                 "tflops": step_rate * flops / opts.batch / 1e12,
                 "fraction_of_matmul": step_rate * flops / opts.batch / matmul,
                 "peak_mem_mb": step_mem, "mem_kind": mem_kind},
        "pipeline": cfg.data.pipeline, "loader_workers": cfg.data.num_workers,
        "cache_build_s" if cfg.data.pipeline == "cached" else "loader_setup_s": prepare_s,
        "cache_bytes": cache.meta["bytes"] if (cache := getattr(train_loader.dataset, "cache", None)) else None,
        "epoch_s": [e[0] for e in epochs], "images_per_s": last[1] / last[0],
        "first_epoch_images_per_s": epochs[0][1] / epochs[0][0],
        "peak_mem_mb": e2e_mem, "mem_kind": mem_kind,
    }


def count_train_flops(task, x, y, accelerator) -> float:
    """FLOPs of one forward + backward of `task` on (x, y). Attention is counted through the math kernel,
    which the counter sees on every device (fused CPU kernels are invisible to it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    task.train()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), accelerator.autocast():
        task(x, y)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_rate(device, dtype) -> float:
    """FLOP/s of a large square matrix multiply in `dtype` on `device`, measured now."""
    import torch

    n = 8192 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- the Hugging Face Trainer peer


_HF_CLASSES = {
    "clip": ("CLIPConfig", "CLIPForImageClassification", "CLIPImageProcessor"),
    "siglip": ("SiglipConfig", "SiglipForImageClassification", "SiglipImageProcessor"),
}


def _hf_model_dir(backbone: str, out: str) -> str:
    """A directory `from_pretrained` loads offline: the backbone itself when it is one, else the preset's
    architecture as an image-classification model with its image processor."""
    from vlfit.models.backbones import PRESETS, build_backbone

    if backbone not in PRESETS:
        return backbone
    import transformers

    _quiet_transformers()
    vision = build_backbone(backbone)
    pre = vision.preprocess
    config_name, model_name, processor_name = _HF_CLASSES[vision.family]
    config = getattr(transformers, config_name)(vision_config=vision.hf_config.to_dict())
    getattr(transformers, model_name)(config).save_pretrained(out)
    resample = {"bilinear": 2, "bicubic": 3}[pre.interpolation]
    if pre.resize == "squash":
        processor = getattr(transformers, processor_name)(
            size={"height": pre.image_size, "width": pre.image_size}, image_mean=list(pre.mean),
            image_std=list(pre.std), resample=resample)
    else:
        processor = getattr(transformers, processor_name)(
            size={"shortest_edge": pre.image_size}, crop_size={"height": pre.image_size, "width": pre.image_size},
            image_mean=list(pre.mean), image_std=list(pre.std), resample=resample)
    processor.save_pretrained(out)
    return out


def _trainer_side(model_dir: str, data_dir: str, workers: int, precision: str, device_type: str,
                  opts: BenchOptions) -> dict[str, Any]:
    """One Trainer run, set up as Hugging Face's image-classification guide does, timed per epoch."""
    import datasets
    import torch
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        DefaultDataCollator,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from vlfit.data.synthetic import HAR_CLASSES
    from vlfit.metrics import peak_memory_mb, reset_peak_memory

    _quiet_transformers()
    datasets.disable_progress_bars()
    # This process was spawned, which made "spawn" its default for loader workers; a script run directly
    # on Linux forks them (and the guide's local `transforms` function would not pickle otherwise).
    multiprocessing.set_start_method("fork", force=True)
    record = json.loads((Path(data_dir) / "labels.json").read_text())
    paths = [str(Path(data_dir) / name) for name in record["files"]]
    train_ds = datasets.Dataset.from_dict({"image": paths, "label": record["labels"]})
    train_ds = train_ds.cast_column("image", datasets.Image())

    # From here on, the guide's code.
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    size = (image_processor.size["shortest_edge"] if "shortest_edge" in image_processor.size
            else (image_processor.size["height"], image_processor.size["width"]))
    _transforms = Compose([RandomResizedCrop(size), ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    train_ds = train_ds.with_transform(transforms)
    label2id = {name: i for i, name in enumerate(HAR_CLASSES)}
    model = AutoModelForImageClassification.from_pretrained(
        model_dir, num_labels=len(HAR_CLASSES), id2label={i: c for c, i in label2id.items()}, label2id=label2id,
        attn_implementation="sdpa", ignore_mismatched_sizes=True)
    out = tempfile.mkdtemp(prefix="vlfit-bench-trainer-")
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    warmup = {"warmup_ratio" if "warmup_ratio" in inspect.signature(TrainingArguments).parameters
              else "warmup_steps": 0.1}
    args = TrainingArguments(
        output_dir=out, remove_unused_columns=False, eval_strategy="no", save_strategy="no", learning_rate=5e-5,
        per_device_train_batch_size=opts.batch, num_train_epochs=opts.epochs, logging_steps=10, **warmup,
        report_to="none", disable_tqdm=True, dataloader_num_workers=workers,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device_type == "cpu")
    class EpochTimer(TrainerCallback):
        """Wall-clock seconds of each training epoch, the GPU's queued work included."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    timer = EpochTimer()
    trainer = Trainer(model=model, args=args, data_collator=DefaultDataCollator(), train_dataset=train_ds,
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its loss lines would interleave with vlfit's table
    device = trainer.args.device
    reset_peak_memory(device)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak, mem_kind = peak_memory_mb(device)
    n = len(train_ds)
    return {"workers": workers, "epoch_s": timer.seconds, "images_per_s": n / timer.seconds[-1],
            "first_epoch_images_per_s": n / timer.seconds[0], "peak_mem_mb": peak, "mem_kind": mem_kind,
            "optimizer": str(getattr(args.optim, "value", args.optim))}


# ----------------------------------------------------------------------------- report


def format_table(record: dict[str, Any]):
    """The rich Table `vlfit bench` prints."""
    from rich.table import Table

    s, step, v = record["settings"], record["step"], record["vlfit"]
    table = Table(title=f"vlfit bench: {s['backbone']} ({s['input_size']} px), batch {s['batch']}, "
                        f"{s['precision']}, {record['device']}", title_justify="left")
    for col in ("measurement", "images/s", "vs faster Trainer", "peak mem (MB)", "notes"):
        table.add_column(col, justify="left" if col in ("measurement", "notes") else "right")
    faster = max((t["images_per_s"] for t in record["trainer"]), default=None)

    def ratio(rate: float) -> str:
        return f"{rate / faster:.2f}x" if faster else "-"

    table.add_row("training step, random tensors", f"{step['images_per_s']:,.0f}", "", f"{step['peak_mem_mb']:,.0f}",
                  f"{step['gflop_per_image']:.3g} GFLOP/image, {step['tflops']:.3g} TFLOP/s = "
                  f"{step['fraction_of_matmul']:.0%} of {record['matmul']['tflops']:.3g} TFLOP/s "
                  f"{record['matmul']['dtype']} matmul")
    setup = (f"cache of {v['cache_bytes'] / 2**20:,.0f} MiB built in {v['cache_build_s']:.1f} s"
             if "cache_build_s" in v else f"loader setup {v['loader_setup_s']:.1f} s")
    table.add_row(f"vlfit epoch, {v['pipeline']} pipeline", f"{v['images_per_s']:,.0f}", ratio(v["images_per_s"]),
                  f"{v['peak_mem_mb']:,.0f}", f"{setup}; first epoch {v['first_epoch_images_per_s']:,.0f} images/s")
    for t in record["trainer"]:
        table.add_row(f"HF Trainer epoch, {t['workers']} loader workers", f"{t['images_per_s']:,.0f}",
                      ratio(t["images_per_s"]), f"{t['peak_mem_mb']:,.0f}",
                      f"first epoch {t['first_epoch_images_per_s']:,.0f} images/s")
    table.caption = (f"{record['dataset']['images']} JPEGs, mean {record['dataset']['mean_kb']:.1f} kB; "
                     f"epoch rows: the last of {s['epochs']} epochs; median of {s['repeat']} interleaved rounds; "
                     f"memory: {v['mem_kind']}")
    return table


def markdown_row(record: dict[str, Any]) -> str:
    """One BENCHMARKS.md table row for `record`."""
    s, step, v, t = record["settings"], record["step"], record["vlfit"], record["trainer"]
    trainer = " / ".join(f"{x['images_per_s']:,.0f}" for x in t) or "-"
    trainer_mem = " / ".join(f"{x['peak_mem_mb']:,.0f}" for x in t) or "-"
    speedup = record["speedup_vs_faster_trainer"]
    speedup = f"{speedup:.2f}x" if speedup else "-"
    return (f"| {record['date']} | {record['device']} | {s['backbone']} | {s['batch']} | {s['precision']} | "
            f"{step['images_per_s']:,.0f} | {step['fraction_of_matmul']:.0%} | {v['pipeline']} | "
            f"{v['images_per_s']:,.0f} | {trainer} | {speedup} | {v['peak_mem_mb']:,.0f} / {trainer_mem} |")


# ----------------------------------------------------------------------------- helpers


def _isolated(fn, *args):
    """fn(*args) in a fresh Python process."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import torchvision
    import transformers

    from vlfit import __version__

    return {"vlfit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda or "-"}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_out(record: dict[str, Any]) -> str:
    device = "".join(c if c.isalnum() else "-" for c in record["device"].split("(")[0].strip().lower()).strip("-")
    return f"bench-{device}-{record['settings']['backbone'].replace('/', '-')}-{record['date']}.json"


def quick_options(**given: Any) -> dict[str, Any]:
    """QUICK's sizes, under whatever was given explicitly."""
    return {**QUICK, **{k: v for k, v in given.items() if v is not None}}

