"""End-to-end training through the library API, on synthetic-har with the tiny presets."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from vlfit.config import load_config
from vlfit.evaluate import evaluate_run
from vlfit.metrics import MetricsLog
from vlfit.train import train

REQUIRED = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "train_images_per_s",
            "peak_mem_mb", "mem_kind", "lr"}
TIMING = {"epoch_time_s", "train_images_per_s", "peak_mem_mb", "train_images_per_s_per_process",
          "peak_mem_mb_per_process"}
QUICK = ["data.num_images=240", "data.image_size=64", "train.epochs=2", "train.micro_batch=32"]


def run(tmp_path_factory, name, overrides):
    run_dir = tmp_path_factory.mktemp(name)
    summary = train(load_config(None, overrides), run_dir, show=False)
    return run_dir, summary


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run(tmp_path_factory, "quick", QUICK)


def metrics_without_timing(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog.read(run_dir / "metrics.jsonl")]


def test_run_directory_holds_everything(quick_run):
    run_dir, summary = quick_run
    for name in ("config.yaml", "split.json", "classes.txt", "metrics.jsonl", "summary.json", "train.log"):
        assert (run_dir / name).is_file(), name
    for ckpt in ("best", "last"):
        files = {p.name for p in (run_dir / "checkpoints" / ckpt).iterdir()}
        assert files == {"model.safetensors", "optimizer.safetensors", "running.safetensors", "rng.safetensors",
                         "state.json"}
    records = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(REQUIRED <= set(r) for r in records)
    assert all(r["mem_kind"] == "cpu_peak_rss" and r["peak_mem_mb"] > 0 for r in records)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)
    assert summary["trainable_params"] > 0 and summary["effective_batch"] == 32 and summary["num_processes"] == 1
    assert all(r["peak_mem_mb_per_process"] == [r["peak_mem_mb"]] and
               r["train_images_per_s_per_process"] == [r["train_images_per_s"]] for r in records)


def test_split_is_written_once_and_stratified(quick_run):
    run_dir, _ = quick_run
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 240
    assert set(split["train"]).isdisjoint(split["val"])
    assert len(split["val"]) == 15 * round(16 * 0.2)  # 16 images per class, 20% of each held out


def test_best_checkpoint_reproduces_recorded_val_acc(quick_run):
    run_dir, summary = quick_run
    result = evaluate_run(run_dir, "best")
    assert result["epoch"] == summary["best_epoch"]
    assert result["val_acc"] == pytest.approx(summary["best_val_acc"], abs=1e-12)
    best = MetricsLog.read(run_dir / "metrics.jsonl")[summary["best_epoch"] - 1]
    assert result["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)


def test_checkpoint_is_safetensors_without_pickle(quick_run):
    run_dir, _ = quick_run
    weights = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert "head.weight" in weights and weights["head.weight"].shape[0] == 15
    meta = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["meta"]
    assert meta["epoch"] == 2 and len(meta["classes"]) == 15


def test_same_seed_same_metrics(quick_run, tmp_path_factory):
    run_dir, _ = quick_run
    again, _ = run(tmp_path_factory, "again", QUICK)
    assert "image cache built" not in (again / "train.log").read_text()  # the first run's cache: nothing decoded
    assert metrics_without_timing(again) == metrics_without_timing(run_dir)
    a = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    b = load_file(again / "checkpoints" / "last" / "model.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_other_seed_other_metrics(quick_run, tmp_path_factory):
    run_dir, _ = quick_run
    other, _ = run(tmp_path_factory, "other", [*QUICK, "train.seed=1"])
    assert metrics_without_timing(other) != metrics_without_timing(run_dir)


def test_accumulation_keeps_effective_batch(tmp_path_factory):
    _, summary = run(tmp_path_factory, "accum", [*QUICK, "train.micro_batch=16", "train.accum_steps=2",
                                                 "train.epochs=1"])
    assert summary["effective_batch"] == 32


def test_reference_pipeline_trains_without_a_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("unused-cache")
    run_dir, summary = run(tmp_path_factory, "reference", [*QUICK, "train.epochs=1", "data.pipeline=torchvision",
                                                          f"data.cache_dir={cache_dir}"])
    assert summary["epochs"] == 1 and 0 <= summary["best_val_acc"] <= 1
    assert list(cache_dir.iterdir()) == []


def test_training_loop_learns(tmp_path_factory):
    """From random weights, the loop drives the training loss down and accuracy above chance."""
    run_dir, summary = run(tmp_path_factory, "learns", [
        "data.num_images=150", "data.image_size=64", "train.epochs=8", "train.micro_batch=16", "train.lr=2e-3",
        "data.crop_scale=[0.9, 1.0]", "data.hflip=0"])
    records = MetricsLog.read(run_dir / "metrics.jsonl")
    chance = 1 / 15
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.1
    assert records[-1]["train_acc"] > 2 * chance and summary["best_val_acc"] > chance
