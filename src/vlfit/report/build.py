"""Assemble the comparison report of finished runs: tables, figures, findings, as files in one folder."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vlfit import __version__
from vlfit.config import flat_keys
from vlfit.errors import UserError
from vlfit.report import plots
from vlfit.report.document import Block, Bullets, Heading, Image, Table, Text, to_html, to_markdown
from vlfit.report.runs import Run, load_run
from vlfit.report.tables import (
    Column,
    epoch_table,
    format_cell,
    summary_columns,
    summary_rows,
    to_csv,
    winners,
)

SUMMARY = "summary.json"
REPORT_TAG = "vlfit_report"  # key in the report's summary.json: marks a folder vlfit may rewrite


def build_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the report of the runs in `run_dirs` (in that order; the first is the reference for
    relative speed and memory) into `out`, and return the path of its report.html.

    `out` is replaced as a whole, once the new report is complete; a non-empty folder that is not
    a vlfit report is never touched.
    """
    if not run_dirs:
        raise UserError("no finished runs to report")
    _check_replaceable(out)
    runs = [load_run(p) for p in run_dirs]
    labels = _labels(runs)
    rows = summary_rows(runs, labels)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / SUMMARY).write_text(json.dumps({REPORT_TAG: 1, "reference": labels[0], "runs": rows}, indent=1) + "\n")
    (tmp / "summary.csv").write_text(to_csv(rows))
    blocks = _blocks(runs, labels, rows, tmp)
    title = "vlfit comparison: " + ", ".join(labels)
    (tmp / "report.md").write_text(to_markdown(title, [Text(_subtitle(runs)), *blocks]))
    (tmp / "report.html").write_text(to_html(title, _subtitle(runs), blocks, tmp))

    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out / "report.html"


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"report folder {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = REPORT_TAG in json.loads((out / SUMMARY).read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"{out} is not empty and is not a vlfit report; choose another --out")


def _labels(runs: list[Run]) -> list[str]:
    """Run names; where two runs share a name, their folder paths tell them apart."""
    names = [r.name for r in runs]
    return [f"{r.path.parent.name}/{r.path.name}" if names.count(r.name) > 1 else r.name for r in runs]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


# ----------------------------------------------------------------------------- content


def _blocks(runs: list[Run], labels: list[str], rows: list[dict[str, Any]], folder: Path) -> list[Block]:
    def figure(name: str, fig, caption: str, wide: bool = False) -> Image:
        plots.save_png(fig, folder / name)
        return Image(name, caption, wide)

    acc_cols, cost_cols = summary_columns(rows)
    first = labels[0]
    shaded = (" Shaded, in a run's colour: the final epochs it trained on every token (FLIP's unmasked phase)."
              if any(run.unmasked_epochs for run in runs) else "")
    blocks: list[Block] = [Heading("Findings"), Bullets(_findings(rows))]

    blocks += [
        Heading("Summary"),
        _summary_table(rows, acc_cols, "Accuracy (validation split; top-5 and macro F1 of the best checkpoint)"),
        _summary_table(rows, cost_cols, f"Training cost (speed and memory relative to {first})"),
        Text(_cost_note(rows), note=True),
        figure("accuracy_vs_time.png", plots.accuracy_vs_time(rows),
               "Best validation accuracy against total training time; bars: one binomial standard error."),
        figure("time_memory.png", plots.time_memory_bars(rows), "Mean training time per epoch and peak memory."),
        figure("accuracy.png", plots.accuracy_curves(runs, labels),
               "Accuracy per epoch: validation solid, training dashed; the star marks the best epoch." + shaded),
        figure("loss.png", plots.loss_curves(runs, labels),
               "Loss per epoch: validation solid (cross-entropy), training dashed (the training objective: "
               "cross-entropy plus the weighted contrastive term for runs that use one)." + shaded),
    ]

    scored = [(run, label) for run, label in zip(runs, labels) if run.eval]
    blocks.append(Heading("Per-class results"))
    if scored:
        blocks += [
            figure("per_class.png", plots.per_class_accuracy(runs, labels),
                   "Accuracy per class (share of the class's validation images classified correctly), best checkpoint.",
                   wide=True),
            _per_class_table(scored),
            Text("Most frequent confusions (true → predicted, images):"),
            Bullets([f"**{label}**: " + _top_confusions(run.eval) for run, label in scored]),
            Heading("Confusion matrices"),
            *[figure(f"confusion-{_slug(label)}.png", plots.confusion_matrix(run, label),
                     f"Confusion matrix of {label}, best checkpoint: counts in cells, colour = share of the true class.",
                     wide=len(run.eval["classes"]) > 8)
              for run, label in scored],
        ]
    missing = [label for run, label in zip(runs, labels) if not run.eval]
    if missing:
        blocks.append(Text(f"No eval.json for {', '.join(missing)}: run `vlfit eval` on "
                           f"{'it' if len(missing) == 1 else 'them'} for per-class results.", note=True))

    masked = [(run, label) for run, label in zip(runs, labels) if run.masked]
    if masked:
        blocks += [Heading("Token masking"),
                   figure("masking.png", plots.masking_bars(rows), "Share of tokens kept and time spent on saliency.")]
        for run, label in masked:
            if run.mask_examples is not None:
                ex = run.mask_examples
                titles = [str(t) for t in ex["titles"]] if "titles" in ex else None
                blocks.append(figure(f"mask-{_slug(label)}.png", plots.mask_overlay(ex["images"], ex["keep"], titles),
                                     f"{label}: validation images with the dropped tokens dimmed.", wide=True))

    blocks.append(Heading("Training per epoch"))
    for run, label in zip(runs, labels):
        titles, cells, best = epoch_table(run)
        cells[best][0] += " (best)"
        blocks += [Heading(label, 3), Table(titles, cells, marked_row=best)]
        if run.unmasked_epochs:
            blocks.append(Text(f"{_epochs_in_words(run.unmasked_epochs).capitalize()} trained on every token "
                               "(unmasked phase): no masking, no saliency pass.", note=True))
    blocks += [Text("Time is the training phase of each epoch (wall clock, evaluation excluded); images/s counts "
                    "training images. The best epoch is the one with the highest validation accuracy.", note=True)]

    blocks += [Heading("Setup"), _setup_table(runs, labels)]
    differences = _config_differences(runs, labels)
    if differences:
        blocks.append(differences)
    return blocks


def _summary_table(rows: list[dict[str, Any]], columns: list[Column], caption: str) -> Table:
    return Table([c.title for c in columns], [[format_cell(c, r.get(c.key)) for c in columns] for r in rows],
                 bold={(r, c) for c, col in enumerate(columns) for r in winners(rows, col)}, caption=caption)


def _per_class_table(scored: list[tuple[Run, str]]) -> Table:
    classes = list(dict.fromkeys(c for run, _ in scored for c in run.eval["classes"]))
    by_run = [{c["class"]: c for c in run.eval["per_class"]} for run, _ in scored]
    rows = []
    for name in classes:
        support = next((d[name]["support"] for d in by_run if name in d), 0)
        accs = [d.get(name, {}).get("accuracy") for d in by_run]
        rows.append([name, str(support), *("–" if a is None else f"{a:.3f}" for a in accs)])
    present = [[a for a in (d.get(n, {}).get("accuracy") for d in by_run)] for n in classes]
    bold = set()
    if len(scored) > 1:
        for r, accs in enumerate(present):
            values = [a for a in accs if a is not None]
            if values and max(values) > min(values):
                bold |= {(r, 2 + j) for j, a in enumerate(accs) if a == max(values)}
    return Table(["class", "images", *(label for _, label in scored)], rows, bold=bold,
                 caption="Per-class accuracy, best checkpoint")


def _top_confusions(ev: dict[str, Any], k: int = 3) -> str:
    cm = np.asarray(ev["confusion_matrix"])
    off = [(cm[t, p], t, p) for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t, p]]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    if not off:
        return "none"
    classes = ev["classes"]
    return "; ".join(f"{classes[t]} → {classes[p]} ({n})" for n, t, p in off[:k])


def _findings(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison in a few sentences, with the uncertainty a validation set of this size allows."""
    first = rows[0]["model"]
    ranked = sorted(rows, key=lambda r: -r["best_val_acc"])
    top = ranked[0]
    tied = [r["model"] for r in ranked if r["best_val_acc"] == top["best_val_acc"]]
    if len(tied) > 1:
        items = [f"Highest validation accuracy: {', '.join(f'**{m}**' for m in tied)} tie at {top['best_val_acc']:.3f}."]
    else:
        items = [f"Highest validation accuracy: **{top['model']}**, {top['best_val_acc']:.3f} at epoch {top['best_epoch']}"
                 + (" (" + ", ".join(f"{r['model']} {r['best_val_acc']:.3f}" for r in ranked[1:]) + ")." if len(rows) > 1 else ".")]
    n = top.get("val_images")
    if len(rows) > 1 and n and len(tied) == 1:
        gap = top["best_val_acc"] - ranked[1]["best_val_acc"]
        se = math.sqrt(sum(r["best_val_acc"] * (1 - r["best_val_acc"]) / n for r in ranked[:2]))
        verdict = "larger than" if gap > 2 * se else "within"
        items.append(f"The lead over {ranked[1]['model']} ({gap:.3f}) is {verdict} two standard errors of the "
                     f"difference on {n} validation images (2 s.e. = {2 * se:.3f}).")
    if len(rows) > 1:
        fast = max(rows, key=lambda r: r["train_images_per_s"])
        slow = min(rows, key=lambda r: r["train_images_per_s"])
        items.append(f"Fastest training: **{fast['model']}**, {fast['train_images_per_s']:.1f} images/s "
                     f"({fast['speed_vs_first']:.2f}x {first}); slowest: {slow['model']}, "
                     f"{slow['train_images_per_s']:.1f} images/s ({slow['speed_vs_first']:.2f}x).")
        light = min(rows, key=lambda r: r["peak_mem_mb"])
        heavy = max(rows, key=lambda r: r["peak_mem_mb"])
        items.append(f"Lowest peak memory: **{light['model']}**, {light['peak_mem_mb']:.0f} MB "
                     f"({light['memory_vs_first']:.2f}x {first}); highest: {heavy['model']}, {heavy['peak_mem_mb']:.0f} MB.")
    for r in rows:
        if r.get("kept_token_fraction") is not None:
            sal = r.get("saliency_time_s")
            share = f", saliency {sal:.1f} s ({sal / r['total_train_time_s']:.0%} of training time)" if sal is not None else ""
            unmasked = r.get("unmasked_epochs")
            phase = (f"; its last {unmasked} epoch{'s' if unmasked > 1 else ''} trained on every token "
                     "(FLIP's unmasked phase)") if unmasked else ""
            items.append(f"{r['model']} keeps {r['kept_token_fraction']:.0%} of tokens on average{share}{phase}.")
    items.append("Best validation accuracy selects its epoch on the validation set itself, so it is optimistic; "
                 "final validation accuracy involves no selection.")
    return items


def _epochs_in_words(epochs: list[int]) -> str:
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"


def _cost_note(rows: list[dict[str, Any]]) -> str:
    kinds = {r.get("mem_kind") for r in rows}
    note = ("Speed vs first: images/s divided by the first run's; memory vs first: peak memory divided by the "
            "first run's. Times are the training phase only, evaluation excluded.")
    if "cpu_peak_rss" in kinds:
        note += (" On a CPU, peak memory is the training process's peak resident set size: weights, optimizer "
                 "state and activations, but also the images held in memory and the Python runtime.")
    if len(kinds) > 1:
        note += " The runs measured memory in different ways (" + ", ".join(sorted(map(str, kinds))) + "): compare with care."
    return note


def _subtitle(runs: list[Run]) -> str:
    run = runs[0]
    data = run.config.get("data", {})
    parts = [f"{len(runs)} run{'s' if len(runs) > 1 else ''}", f"data: {data.get('source', '?')}"]
    if run.train_images is not None:
        parts.append(f"{run.train_images} training / {run.val_images} validation images")
    if run.eval:
        parts.append(f"{len(run.eval['classes'])} classes")
    devices = sorted({str(r.summary.get("device")) for r in runs})
    parts.append("device: " + "; ".join(devices))
    parts.append(f"vlfit {__version__}")
    return " · ".join(parts)


def _setup_table(runs: list[Run], labels: list[str]) -> Table:
    rows = []
    for run, label in zip(runs, labels):
        s, train = run.summary, run.config.get("train", {})
        rows.append([label, str(run.path.name), str(s.get("backbone")), str(len(run.epochs)),
                     str(s.get("effective_batch", "–")), str(train.get("lr", "–")),
                     {"no": "fp32"}.get(s.get("precision"), str(s.get("precision", "–"))),
                     str(s.get("device", "–")), str(s.get("versions", {}).get("torch", "–"))])
    return Table(["model", "run folder", "backbone", "epochs", "batch", "lr", "precision", "device", "torch"], rows,
                 caption="Runs")


def _config_differences(runs: list[Run], labels: list[str]) -> Table | None:
    """The config keys whose values differ between runs (the run name aside)."""
    flat = [flat_keys(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"name"})
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    if len(runs) < 2 or not differing:
        return None
    rows = [[k, *(json.dumps(f.get(k)) if not isinstance(f.get(k), str) else f[k] for f in flat)] for k in differing]
    return Table(["config key", *labels], rows, caption="Config keys that differ between the runs")
