"""`vlfit data inspect`: what a run would train on, shown before any training.

It runs the same check and split as a training run, writes the same records, adds a grid of
sample images per class, and prints classes, counts per split, duplicates, unusable files and
image sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from rich.console import Console
from rich.table import Table

from vlfit.config import DataConfig
from vlfit.data.prepare import BAD_FILES, CLASSES, DUPLICATES, SPLIT, Survey, survey_data
from vlfit.data.sources import ImageSet
from vlfit.errors import UserError

SAMPLES = "samples.png"
REPORT_FILES = {CLASSES, SPLIT, BAD_FILES, DUPLICATES, SAMPLES}
_SHOWN = 15  # rows of bad files and duplicate groups printed; the files hold all of them


def inspect_data(cfg: DataConfig, out_dir: Path, per_class: int = 8, console: Console | None = None) -> list[str]:
    """Check the data, write its records and samples.png to `out_dir`, print a report, and return the
    problems that would stop a training run (empty when there are none)."""
    console = console or Console()
    _prepare_out_dir(out_dir)
    survey = survey_data(cfg)
    survey.write(out_dir)
    problems = survey.problems()
    sides = None
    if not problems:
        try:
            images, split = survey.fixed_split(out_dir)
            sides = {"train": split.train, "val": split.val}
        except UserError as err:
            problems.append(str(err))
    if sides is None:
        (out_dir / SPLIT).unlink(missing_ok=True)  # a stale split from an earlier inspection would mislead
        images, origin, _ = survey.image_set()
        # No split: each source split counts as itself, and a hold-out's share of the training split is unknown.
        labelled = images.labels >= 0  # an unlabelled validation split has labels -1
        sides = {"train": np.flatnonzero(labelled & (origin == cfg.train_split)),
                 "val": np.flatnonzero(labelled & (origin == cfg.val_split)) if cfg.val_split else None}
    sample_grid(images, per_class, cfg.split_seed).save(out_dir / SAMPLES)

    _print_report(console, survey, images, sides)
    console.print(f"records and {SAMPLES} written to {out_dir}")
    return problems


def _prepare_out_dir(out_dir: Path) -> None:
    """Use `out_dir` only if it is new, empty, or holds nothing but an earlier inspection's records."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is a file")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            raise UserError(f"--out {out_dir} holds other files ({', '.join(foreign[:3])}); choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _print_report(console: Console, survey: Survey, images: ImageSet, sides: dict[str, np.ndarray | None]) -> None:
    """The report; `sides` holds the indices into `images` of "train" and "val" (None: not known)."""
    cfg = survey.cfg
    how = (f"validation split {cfg.val_split!r}" if cfg.val_split else f"split file {cfg.split_file}"
           if cfg.split_file else f"{cfg.val_fraction:.0%} stratified hold-out, seed {cfg.split_seed}")
    console.print(f"[bold]{cfg.source}[/] {cfg.location}: split {cfg.train_split!r}, {how}")

    table = Table("label", "class", "train", "val", "total", title="classes", title_justify="left")
    n = len(images.classes)
    train = np.bincount(images.labels[sides["train"]], minlength=n)
    known = sides["val"] is not None
    val = np.bincount(images.labels[sides["val"]], minlength=n) if known else np.zeros(n, dtype=np.int64)
    for c, name in enumerate(images.classes):
        table.add_row(str(c), name, str(train[c]), str(val[c]) if known else "-", str(train[c] + val[c]))
    table.add_row("", "all", str(train.sum()), str(val.sum()) if known else "-", str(train.sum() + val.sum()),
                  style="bold")
    console.print(table)

    bad = survey.bad
    console.print(f"unusable: {len(bad)} of {len(survey.entries)} images or rows "
                  f"(limit data.max_bad_fraction {cfg.max_bad_fraction:.1%})")
    if bad:
        rows = Table("name", "split", "reason")
        for i in bad[:_SHOWN]:
            e = survey.entries[i]
            rows.add_row(e.name, e.split, e.problem)
        console.print(rows)
        if len(bad) > _SHOWN:
            console.print(f"  ... and {len(bad) - _SHOWN} more in {BAD_FILES}")

    record = survey.duplicates_record()
    console.print(f"duplicates: {record['exact_groups']} exact and {record['near_groups']} near groups "
                  f"({record['images_in_groups']} images), each kept on one side of the split; "
                  f"{record['dropped']} copies dropped")
    for group in record["groups"][:_SHOWN]:
        members = ", ".join(f"{m['name']} ({m['label'] or m['split']})" for m in group["members"])
        console.print(f"  {group['kind']}: {members}")
    if len(record["groups"]) > _SHOWN:
        console.print(f"  ... and {len(record['groups']) - _SHOWN} more groups in {DUPLICATES}")

    stats = survey.size_stats()
    (w_min, w_med, w_max), (h_min, h_med, h_max) = stats["width"], stats["height"]
    modes = ", ".join(f"{mode} {n}" for mode, n in stats["modes"].items())
    console.print(f"image sizes: width {w_min}-{w_max} (median {w_med:.0f}), height {h_min}-{h_max} "
                  f"(median {h_med:.0f}); stored as {modes or 'nothing'}, all used as RGB; "
                  f"{stats['rotated']} turned upright by their EXIF orientation")


def sample_grid(images: ImageSet, per_class: int, seed: int, tile: int = 72, pad: int = 4) -> Image.Image:
    """One row per class: its name, then up to `per_class` of its images drawn at random by `seed`."""
    font = _font()
    label_width = int(max((font.getlength(c) for c in images.classes), default=0)) + 3 * pad
    width = label_width + per_class * (tile + pad) + pad
    height = len(images.classes) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    rng = np.random.default_rng(seed)
    for row, name in enumerate(images.classes):
        y = pad + row * (tile + pad)
        draw.text((pad, y + tile // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        members = rng.permutation(np.flatnonzero(images.labels == row))[:per_class]
        for col, i in enumerate(members):
            thumb = ImageOps.pad(Image.fromarray(images.images[i]), (tile, tile), color=(235, 235, 235))
            canvas.paste(thumb, (label_width + col * (tile + pad), y))
    return canvas


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except (TypeError, ImportError, OSError):  # a Pillow without FreeType has only the fixed bitmap font
        return ImageFont.load_default()
