"""The report's figures, drawn with matplotlib's object API (no pyplot, no global state, no display
needed). Each function returns a Figure; `save_png` writes one. A model keeps its colour in every figure."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from vlfit.report.runs import Run

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD"]  # seaborn's "deep": distinct, print-friendly, colour-blind tolerable
MEMORY_KINDS = {"cpu_peak_rss": "process peak RSS", "cuda_max_allocated": "CUDA peak allocated"}


# Sizes for figures shown at about their pixel size on a page; rc values are read when artists are made.
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "legend.title_fontsize": 9, "axes.spines.top": False, "axes.spines.right": False}


def _styled(draw):
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    # No "Software" stamp: the PNG then holds no URL and depends only on the data drawn.
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": None})


@_styled
def accuracy_curves(runs: list[Run], labels: list[str]) -> Figure:
    """Validation (solid) and training (dashed) accuracy per epoch of every run on one chart; a star marks the best
    epoch, a shaded span in a run's colour the epochs it trained unmasked."""
    return _curves(runs, labels, "acc", "accuracy", "Accuracy per epoch", best_marker=True)


@_styled
def loss_curves(runs: list[Run], labels: list[str]) -> Figure:
    """Validation (solid) and training (dashed) loss per epoch of every run; unmasked epochs shaded."""
    return _curves(runs, labels, "loss", "loss", "Loss per epoch", best_marker=False)


def _curves(runs: list[Run], labels: list[str], metric: str, ylabel: str, title: str, best_marker: bool) -> Figure:
    fig = Figure(figsize=(5.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (run, label) in enumerate(zip(runs, labels)):
        x = [r["epoch"] for r in run.epochs]
        ax.plot(x, [r[f"val_{metric}"] for r in run.epochs], "-o", color=color(i), ms=4, lw=2, label=label)
        ax.plot(x, [r[f"train_{metric}"] for r in run.epochs], "--", color=color(i), lw=1.5, alpha=0.8)
        if best_marker:
            best = run.best
            ax.plot([best["epoch"]], [best["val_acc"]], "*", color=color(i), ms=16, mec="black", mew=0.8, zorder=5)
        if run.unmasked_epochs:  # point k ends epoch k: the unmasked epochs trained from k_first - 1 on
            ax.axvspan(run.unmasked_epochs[0] - 1, run.unmasked_epochs[-1], color=color(i), alpha=0.12, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    models = ax.legend(loc="best", title="model")
    ax.add_artist(models)
    styles = [Line2D([], [], color="gray", ls="-", marker="o", ms=4, label="validation"),
              Line2D([], [], color="gray", ls="--", label="training")]
    if best_marker:
        styles.append(Line2D([], [], color="gray", ls="", marker="*", ms=12, mec="black", label="best epoch"))
    if any(run.unmasked_epochs for run in runs):
        styles.append(Patch(color="gray", alpha=0.25, lw=0, label="unmasked epochs"))
    ax.legend(handles=styles, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=len(styles), frameon=False)
    return fig


@_styled
def time_memory_bars(rows: list[dict[str, Any]]) -> Figure:
    """Mean epoch time and peak memory per model, side by side."""
    fig = Figure(figsize=(6.2, 3.9), layout="constrained")
    names = [r["model"] for r in rows]
    kinds = {r["mem_kind"] for r in rows if r.get("mem_kind")}
    mem_label = "peak memory (MB" + (f", {MEMORY_KINDS.get(next(iter(kinds)), next(iter(kinds)))})" if len(kinds) == 1 else ")")
    for j, (key, ylabel, fmt, title) in enumerate([
        ("mean_epoch_time_s", "seconds", "{:.1f}", "Mean training time per epoch"),
        ("peak_mem_mb", mem_label, "{:.0f}", "Peak memory"),
    ]):
        ax = fig.add_subplot(1, 2, j + 1)
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[color(i) for i in range(len(rows))])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2)
        ax.set_xticks(range(len(rows)), names, rotation=20 if len(rows) > 2 else 0, ha="right" if len(rows) > 2 else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(0, max(values) * 1.18 if max(values) > 0 else 1)
        ax.grid(axis="y", alpha=0.3)
    return fig


@_styled
def accuracy_vs_time(rows: list[dict[str, Any]]) -> Figure:
    """Best validation accuracy against total training time: the trade-off at a glance.

    Error bars are one binomial standard error of the accuracy on the validation set's size."""
    fig = Figure(figsize=(5.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    tops = []
    for i, r in enumerate(rows):
        p, n = r["best_val_acc"], r.get("val_images")
        err = math.sqrt(p * (1 - p) / n) if n else None
        tops.append(p + (err or 0))
        ax.errorbar([r["total_train_time_s"]], [p], yerr=None if err is None else [err], fmt="o", ms=9,
                    color=color(i), capsize=4, label=r["model"])
    ax.set_xlim(0, max(r["total_train_time_s"] for r in rows) * 1.25)
    ax.set_ylim(0, min(1.0, max(tops) * 1.1 + 0.02))
    ax.set_xlabel("total training time (s)")
    ax.set_ylabel("best validation accuracy")
    ax.set_title("Accuracy against training time (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")  # a legend, not labels by the points: close points would overprint them
    return fig


@_styled
def per_class_accuracy(runs: list[Run], labels: list[str]) -> Figure | None:
    """Each class's accuracy (its recall) for every run that has eval.json; None when none has."""
    scored = [(i, run, label) for i, (run, label) in enumerate(zip(runs, labels)) if run.eval]
    if not scored:
        return None
    classes = list(dict.fromkeys(c for _, run, _ in scored for c in run.eval["classes"]))
    k = len(scored)
    height = 0.8 / k
    fig = Figure(figsize=(8.4, 1.3 + 0.12 * len(classes) * max(k, 2)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(classes))
    for j, (i, run, label) in enumerate(scored):
        acc = {c["class"]: c["accuracy"] for c in run.eval["per_class"]}
        values = [acc.get(c) if acc.get(c) is not None else np.nan for c in classes]
        ax.barh(y - 0.4 + height * (j + 0.5), values, height=height, color=color(i), label=label)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy on the class's validation images (recall)")
    ax.set_title("Per-class accuracy, best checkpoint")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


@_styled
def confusion_matrix(run: Run, label: str) -> Figure:
    """The best checkpoint's confusion matrix: counts written in the cells, colour = share of the true class."""
    ev = run.eval
    cm = np.asarray(ev["confusion_matrix"])
    classes = ev["classes"]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = max(4.0, 0.32 * n + 1.8)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            if cm[t, p]:
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=50, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{label}: accuracy {ev['val_acc']:.3f} on {ev['images']} images (epoch {ev['epoch']})")
    fig.colorbar(image, ax=ax, shrink=0.7, label="share of the true class")
    return fig


@_styled
def masking_bars(rows: list[dict[str, Any]]) -> Figure:
    """For masked runs: the mean share of tokens kept, and the time spent on saliency within the training time."""
    masked = [(i, r) for i, r in enumerate(rows) if "kept_token_fraction" in r]
    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    names = [r["model"] for _, r in masked]
    x = np.arange(len(masked))
    ax = fig.add_subplot(1, 2, 1)
    kept = [r["kept_token_fraction"] if r["kept_token_fraction"] is not None else np.nan for _, r in masked]
    bars = ax.bar(x, kept, width=0.5, color=[color(i) for i, _ in masked])
    ax.bar_label(bars, labels=["–" if np.isnan(v) else f"{v:.2f}" for v in kept], fontsize=8, padding=2)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_xlim(-0.75, len(masked) - 0.25)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("mean share of tokens kept")
    ax.set_title("Kept tokens")
    ax = fig.add_subplot(1, 2, 2)
    total = [r["total_train_time_s"] for _, r in masked]
    sal = [r["saliency_time_s"] if r.get("saliency_time_s") is not None else 0.0 for _, r in masked]
    ax.bar(x, total, width=0.5, color="#dddddd", label="total training")
    bars = ax.bar(x, sal, width=0.5, color=[color(i) for i, _ in masked], label="saliency")
    ax.bar_label(bars, labels=[f"{s:.1f} s ({s / t:.0%})" if t else f"{s:.1f} s" for s, t in zip(sal, total)],
                 fontsize=8, padding=2)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_xlim(-0.75, len(masked) - 0.25)
    ax.set_ylabel("seconds")
    ax.set_title("Time spent on saliency")
    ax.legend(fontsize=8)
    return fig


@_styled
def mask_overlay(images: np.ndarray, keep: np.ndarray, titles: list[str] | None = None) -> Figure:
    """A row of images with the tokens a mask drops dimmed, so a reader sees what the mask keeps.

    `images` is (N, H, W, 3) uint8; `keep` is (N, h, w) bool, one cell per token of the patch grid
    (True: kept), stretched over the image.
    """
    images, keep = np.asarray(images), np.asarray(keep, dtype=bool)
    if images.ndim != 4 or keep.ndim != 3 or len(images) != len(keep):
        raise ValueError(f"expected images (N, H, W, 3) and keep (N, h, w), got {images.shape} and {keep.shape}")
    n, height, width = images.shape[:3]
    rows = (np.arange(height) * keep.shape[1]) // height
    cols = (np.arange(width) * keep.shape[2]) // width
    fig = Figure(figsize=(1.9 * n, 2.3), layout="constrained")
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        kept = keep[i][rows][:, cols]
        shown = images[i].astype(np.float32) * np.where(kept, 1.0, 0.22)[..., None]
        ax.imshow(shown.astype(np.uint8), interpolation="nearest")
        ax.contour(kept.astype(float), levels=[0.5], colors="#ffd54f", linewidths=0.8)
        title = titles[i] if titles else ""
        ax.set_title(f"{title}\nkept {keep[i].mean():.0%}".strip(), fontsize=8)
        ax.axis("off")
    return fig
