"""The report's numbers: one summary row per run and one epoch table per run, computed from
metrics.jsonl, summary.json and eval.json, plus their CSV, JSON and Markdown forms."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlfit.console import COLUMNS
from vlfit.report.runs import Run

# Epoch table: the console's columns without the learning rate, then the masking columns of masked runs.
EPOCH_COLUMNS = [c for c in COLUMNS if c[0] != "lr"]
MASK_COLUMNS = [("kept_token_fraction", "kept tokens", "{:.2f}"), ("saliency_time_s", "saliency (s)", "{:.1f}")]


@dataclass(frozen=True)
class Column:
    key: str  # key in a summary row
    title: str
    fmt: str  # format of a present value; None prints as an en dash
    better: str | None = None  # "high" / "low": the report marks the best run of the column


ACCURACY_COLUMNS = [
    Column("model", "model", "{}"),
    Column("backbone", "backbone", "{}"),
    Column("method", "method", "{}"),
    Column("trainable_params", "trainable params", "{}"),
    Column("best_val_acc", "best val acc", "{:.3f}", "high"),
    Column("best_epoch", "best epoch", "{}"),
    Column("final_val_acc", "final val acc", "{:.3f}", "high"),
    Column("top5_acc", "top-5 acc", "{:.3f}", "high"),
    Column("macro_f1", "macro F1", "{:.3f}", "high"),
]
COST_COLUMNS = [
    Column("model", "model", "{}"),
    Column("mean_epoch_time_s", "mean epoch (s)", "{:.1f}", "low"),
    Column("train_images_per_s", "images/s", "{:.1f}", "high"),
    Column("peak_mem_mb", "peak mem (MB)", "{:.0f}", "low"),
    Column("total_train_time_s", "total train (s)", "{:.1f}", "low"),
    Column("speed_vs_first", "speed vs first", "{:.2f}x"),
    Column("memory_vs_first", "memory vs first", "{:.2f}x"),
]
MASK_SUMMARY_COLUMNS = [
    Column("kept_token_fraction", "kept tokens", "{:.2f}"),
    Column("saliency_time_s", "saliency total (s)", "{:.1f}"),
]


def summary_rows(runs: list[Run], labels: list[str]) -> list[dict[str, Any]]:
    """One row per run with full-precision numbers; speed and memory are relative to the first run.

    Accuracy, time and memory come from metrics.jsonl (so they equal the epochs' own records),
    size and setup from summary.json, top-5 and macro F1 from eval.json when the run has one.
    """
    rows = []
    for run, label in zip(runs, labels):
        epochs, best, ev = run.epochs, run.best, run.eval or {}
        row = {
            "model": label,
            "backbone": run.summary.get("backbone", run.config.get("model", {}).get("backbone")),
            "method": method_of(run),
            "trainable_params": run.summary.get("trainable_params"),
            "total_params": run.summary.get("total_params"),
            "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "final_val_acc": epochs[-1]["val_acc"],
            "top5_acc": ev.get("top5_acc"),
            "macro_f1": ev.get("macro_f1"),
            "val_images": run.val_images,
            "epochs": len(epochs),
            "mean_epoch_time_s": float(np.mean([r["epoch_time_s"] for r in epochs])),
            "train_images_per_s": float(np.mean([r["train_images_per_s"] for r in epochs])),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in epochs),
            "mem_kind": epochs[-1].get("mem_kind"),
            "total_train_time_s": float(np.sum([r["epoch_time_s"] for r in epochs])),
            "effective_batch": run.summary.get("effective_batch"),
            "precision": run.summary.get("precision"),
            "device": run.summary.get("device"),
        }
        if run.masked:
            row["kept_token_fraction"] = _mean_of(epochs, "kept_token_fraction")  # unmasked epochs included
            row["saliency_time_s"] = _sum_of(epochs, "saliency_time_s")
            row["unmasked_epochs"] = len(run.unmasked_epochs)
        rows.append(row)
    first = rows[0]
    for row in rows:
        row["speed_vs_first"] = row["train_images_per_s"] / first["train_images_per_s"]
        row["memory_vs_first"] = row["peak_mem_mb"] / first["peak_mem_mb"]
    return rows


def method_of(run: Run) -> str:
    """What was trained, in words, from the run's resolved config (keys a run lacks are skipped)."""
    if run.summary.get("method"):
        return str(run.summary["method"])
    model = run.config.get("model") or {}
    finetune = model.get("finetune")
    trainable, total = run.summary.get("trainable_params"), run.summary.get("total_params")
    if finetune in FINETUNE_WORDS:
        parts = [FINETUNE_WORDS[finetune]]
    elif trainable and total and trainable < total:
        parts = [f"partial fine-tune ({trainable / total:.0%} trainable)"]
    else:
        parts = ["full fine-tune"]
    mask = model.get("mask") or {}
    if mask.get("kind") not in (None, "none"):
        parts.append(f"{mask['kind']} masking, keep {mask.get('keep_ratio')}")
        if n := len(run.unmasked_epochs):  # as trained (a short run may train fewer than its config asks)
            parts.append(f"last {n} epoch{'s' if n > 1 else ''} unmasked")
    elif run.masked:
        parts.append("token masking")
    if model.get("head") == "zeroshot":
        parts.append("zero-shot head init")
    weight = (run.config.get("loss") or {}).get("contrastive_weight") or 0
    if weight > 0:
        parts.append(f"contrastive loss x{weight}")
    return ", ".join(parts)


FINETUNE_WORDS = {"full": "full fine-tune", "linear_probe": "linear probe", "lora": "LoRA"}


def epoch_columns(run: Run) -> list[tuple[str, str, str]]:
    return EPOCH_COLUMNS + [c for c in MASK_COLUMNS if run.has(c[0])]


def epoch_table(run: Run) -> tuple[list[str], list[list[str]], int]:
    """(titles, formatted rows, index of the best epoch's row) of the run's per-epoch table."""
    columns = epoch_columns(run)
    rows = [[fmt.format(r[key]) if r.get(key) is not None else "–" for key, _, fmt in columns] for r in run.epochs]
    return [title for _, title, _ in columns], rows, run.epochs.index(run.best)


def summary_columns(rows: list[dict[str, Any]]) -> tuple[list[Column], list[Column]]:
    """(accuracy columns, cost columns), the cost table growing masking columns when a run is masked."""
    masked = any("kept_token_fraction" in r for r in rows)
    return ACCURACY_COLUMNS, COST_COLUMNS + (MASK_SUMMARY_COLUMNS if masked else [])


def format_cell(column: Column, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column.key == "trainable_params":
        return human_count(value)
    return column.fmt.format(value)


def winners(rows: list[dict[str, Any]], column: Column) -> set[int]:
    """The rows holding the best value of `column` (all of them on a tie); none when every run has the same."""
    values = {i: r[column.key] for i, r in enumerate(rows) if r.get(column.key) is not None}
    if column.better is None or len(set(values.values())) < 2:
        return set()
    best = (max if column.better == "high" else min)(values.values())
    return {i for i, v in values.items() if v == best}


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def to_csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float) else row[k]
                         for k in keys})
    return out.getvalue()


def markdown_table(titles: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(titles), "|" + "|".join("---" for _ in titles) + "|", *map(line, rows)])


def _mean_of(epochs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in epochs if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _sum_of(epochs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in epochs if r.get(key) is not None]
    return float(np.sum(values)) if values else None
