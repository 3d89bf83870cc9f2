"""The `vlfit` command: a thin layer over the library. User errors exit 2 with one clear message."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import click

from vlfit.errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl")

overrides_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.lr=3e-4 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlfit")
def cli() -> None:
    """Fine-tune CLIP-family vision backbones for image classification and compare them."""


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the run (default: runs/NAME-TIMESTAMP).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its newest good checkpoint (CONFIG is then optional).")
def train(config: Path | None, overrides: tuple[str, ...], run_dir: Path | None, overwrite: bool,
          resume_dir: Path | None) -> None:
    """Train and evaluate every epoch, as CONFIG (YAML) says, or continue a run with --resume."""
    if resume_dir is not None:
        if overwrite or (run_dir is not None and run_dir != resume_dir):
            raise UserError("--resume RUN_DIR continues that run in place; it cannot be combined with "
                            "--overwrite or another --run-dir")
        if not (resume_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {resume_dir} is not a vlfit run directory (no config.yaml)")
        run_dir = resume_dir
    elif config is None:
        raise UserError("missing CONFIG: give a config file, or --resume RUN_DIR to continue a run")
    summary, run_dir = start_training(config, list(overrides), run_dir, overwrite, resume_dir)
    echo(f"best val_acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), "
         f"mean epoch {summary['mean_epoch_time_s']:.1f} s, peak memory {summary['peak_mem_mb']:.0f} MB "
         f"({summary['mem_kind']}); run in {run_dir}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
def validate(config: Path, overrides: tuple[str, ...]) -> None:
    """Check CONFIG and print it fully resolved, without loading data or models."""
    from vlfit.config import load_config

    echo(load_config(config, list(overrides)).to_yaml(), nl=False)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
def zeroshot(config: Path, overrides: tuple[str, ...]) -> None:
    """Score the zero-shot classifier (class prompts through the text tower) on CONFIG's validation split."""
    from vlfit.config import load_config
    from vlfit.zeroshot import zeroshot as run_zeroshot

    setup_logging()
    r = run_zeroshot(load_config(config, list(overrides)))
    echo(f"zero-shot {r['backbone']}: val_acc {r['val_acc']:.4f}, val_loss {r['val_loss']:.4f} "
               f"({r['images']} images, {r['classes']} classes)")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--data", "data", multiple=True, metavar="KEY=VALUE",
              help="Score other data: override the run's data section, e.g. --data seed=1 (repeatable). "
                   "That data is checked as training checks it, and the kept images of its val_split (else of "
                   "its train_split) are scored; none may be one the run trained on.")
def eval_(run_dir: Path, checkpoint: str, data: tuple[str, ...]) -> None:
    """Score a run's checkpoint: accuracy, top-5, macro F1, per-class accuracy, confusion matrix."""
    from vlfit.evaluate import evaluate_run

    setup_logging()
    r = evaluate_run(run_dir, checkpoint, list(data))
    where = "its validation split" if not data else f"data {' '.join(data)}"
    echo(f"{checkpoint} checkpoint (epoch {r['epoch']}) on {where}, {r['images']} images:")
    # A checkpoint taken part way through an epoch has no recorded validation score.
    recorded = "n/a" if r["recorded_val_acc"] is None else f"{r['recorded_val_acc']:.4f}"
    echo(f"  val_acc {r['val_acc']:.4f} (recorded {recorded}), top-{r['top_k']} "
               f"{r['top5_acc']:.4f}, macro F1 {r['macro_f1']:.4f}, val_loss {r['val_loss']:.4f}")
    width = max(len(c["class"]) for c in r["per_class"])
    echo(f"  {'class'.ljust(width)}  images  accuracy  precision      f1")
    for c in r["per_class"]:
        cells = [f"{c[k]:.3f}" if c[k] is not None else "-" for k in ("accuracy", "precision", "f1")]
        echo(f"  {c['class'].ljust(width)}  {c['support']:6d}  {cells[0]:>8}  {cells[1]:>9}  {cells[2]:>6}")
    echo(f"written to {r['path']} (with the confusion matrix)")


@cli.group()
def data() -> None:
    """Look at a dataset before training on it."""


@data.command("inspect")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the data records and samples.png (default: runs/NAME-data).")
@click.option("--per-class", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Sample images per class in samples.png.")
def inspect(config: Path, overrides: tuple[str, ...], out: Path | None, per_class: int) -> None:
    """Check CONFIG's data as training would: classes, counts, duplicates, bad files, sizes, sample grid.

    Exits 2 after the report when a training run would refuse the data."""
    from vlfit.config import load_config
    from vlfit.data.inspect import inspect_data
    from vlfit.data.prepare import refuse

    cfg = load_config(config, list(overrides))
    setup_logging()
    refuse(inspect_data(cfg.data, out or Path("runs") / f"{cfg.name}-data", per_class))


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"),
              show_default=True, help="Folder for the runs (OUT/NAME) and the report (OUT/report).")
def compare(configs: tuple[Path, ...], overrides: tuple[str, ...], out: Path) -> None:
    """Train each CONFIG on the same data split, skipping finished runs, then write the report."""
    from vlfit.compare import compare as run_compare

    setup_logging()
    print_summary(run_compare(list(configs), list(overrides), out, say=echo))


@cli.command()
@overrides_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for the runs and the report.")
def demo(overrides: tuple[str, ...], out: Path) -> None:
    """Compare every config in configs/demo/ offline on synthetic-har (CLIP, SigLIP, ...)."""
    from vlfit.compare import compare as run_compare
    from vlfit.compare import demo_configs

    setup_logging()
    configs = demo_configs()
    echo("demo: " + ", ".join(str(c) for c in configs))
    print_summary(run_compare(configs, list(overrides), out, say=echo))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default: REPORT beside the runs, or inside the one folder of runs named).")
def report(run_dirs: tuple[Path, ...], out: Path | None) -> None:
    """Rebuild the comparison report from finished RUN_DIRS alone (or from a folder of runs)."""
    from vlfit.report import build_report, expand_run_dirs

    setup_logging()
    runs = expand_run_dirs(list(run_dirs))
    if out is None:
        parents = {p.parent for p in runs}
        out = (parents.pop() if len(parents) == 1 else Path(".")) / "report"
    echo(f"report: {build_report(runs, out)}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to show per image.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the predictions to this CSV file (path, rank, class, probability) instead of printing them.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
def predict(run_dir: Path, images: tuple[Path, ...], top_k: int, csv_path: Path | None, checkpoint: str) -> None:
    """Classify IMAGES (files or folders) with a trained run: top-k classes and probabilities."""
    from vlfit.predict import predict as run_predict
    from vlfit.predict import write_csv

    setup_logging()
    predictions = run_predict(run_dir, list(images), top_k, checkpoint)  # under a launcher: the main process's
    if csv_path is not None:
        rows = list(predictions)
        write_csv(rows, csv_path)
        echo(f"{len(rows)} images: predictions in {csv_path}")
        return
    for p in predictions:
        echo(f"{p.path}: " + (f"skipped: {p.problem}" if p.problem else
                              ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)))


def print_summary(report: Path) -> None:
    """The report's headline numbers as a table on the console, then where the report is."""
    import json

    from rich.console import Console
    from rich.table import Table

    from vlfit.distributed import process_index

    if process_index() != 0:
        return
    rows = json.loads((report.parent / "summary.json").read_text())["runs"]
    table = Table("model", title="comparison (speed and memory relative to the first)", title_justify="left")
    for title in ("best val acc", "epoch", "images/s", "speed", "peak mem (MB)", "memory"):
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['best_val_acc']:.3f}", str(r["best_epoch"]), f"{r['train_images_per_s']:.1f}",
                      f"{r['speed_vs_first']:.2f}x", f"{r['peak_mem_mb']:.0f}", f"{r['memory_vs_first']:.2f}x")
    Console().print(table)
    echo(f"report: {report}")


def start_training(config: Path | None, overrides: list[str], run_dir: Path | None, overwrite: bool = False,
                   resume_dir: Path | None = None) -> tuple[dict, Path]:
    """Train `config` (or resume `resume_dir`) as `vlfit train` does; returns (summary, run directory).

    Under a launcher every process calls this; the main process names and prepares the run
    directory, and the others wait for it."""
    from vlfit.config import load_config
    from vlfit.distributed import main_decides, start_processes
    from vlfit.train import train as run_training
    from vlfit.train import uses_gpu

    cfg = load_config(config if config is not None else run_dir / "config.yaml", overrides)
    start_processes(cpu=not uses_gpu(cfg.train))
    if resume_dir is None:
        run_dir = main_decides(new_run_dir, run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               overwrite)
    setup_logging()
    return run_training(cfg, run_dir, resume=resume_dir is not None), run_dir


def new_run_dir(run_dir: Path, overwrite: bool) -> Path:
    prepare_run_dir(run_dir, overwrite)
    return run_dir


@cli.command()
@click.option("--backbone", default="tiny-clip", show_default=True, help="Preset, hub id or local directory.")
@click.option("--batch", type=click.IntRange(min=1), help="Images per training step, both sides  [default: 128]")
@click.option("--images", type=click.IntRange(min=1), help="JPEGs in the generated dataset  [default: 10080]")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs per end-to-end run; the last is reported  "
              "[default: 2]")
@click.option("--steps", type=click.IntRange(min=1), help="Timed steps on random tensors  [default: 30]")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rounds of all measurements, interleaved; each is reported as its median.")
@click.option("--quick", is_flag=True, help="Small sizes (128 images, batch 32, 5 steps): minutes on a CPU.")
@click.option("--trainer/--no-trainer", default=True, show_default=True,
              help="Also run the Hugging Face Trainer peer.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Keep the generated JPEGs here and reuse them.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON output (default: bench-DEVICE-BACKBONE-DATE.json).")
@overrides_option
def bench(backbone: str, batch: int | None, images: int | None, epochs: int | None, steps: int | None, repeat: int,
          quick: bool, trainer: bool, data_dir: str | None, out: Path | None, overrides: tuple[str, ...]) -> None:
    """Measure vlfit's training speed and memory next to the Hugging Face Trainer (see BENCHMARKS.md)."""
    from rich.console import Console

    from vlfit.bench import BenchOptions, default_out, format_table, markdown_row, quick_options, run_bench

    setup_logging()
    given = dict(batch=batch, images=images, epochs=epochs, steps=steps)
    sizes = quick_options(**given) if quick else {k: v for k, v in given.items() if v is not None}
    opts = BenchOptions(backbone=backbone, overrides=list(overrides), trainer=trainer, data_dir=data_dir,
                        repeat=repeat, **sizes)
    record = run_bench(opts, command=" ".join(["vlfit", *map(shlex.quote, sys.argv[1:])]))
    out = out or Path(default_out(record))
    out.write_text(json.dumps(record, indent=1) + "\n")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: keep each row on one line
        console = Console(width=200)
    console.print(format_table(record))
    console.print(f"BENCHMARKS.md row:\n{markdown_row(record)}", highlight=False, soft_wrap=True)
    click.echo(f"written to {out}")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create an empty run directory. Never deletes anything that is not a vlfit run, and a run only
    with --overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not any((run_dir / m).exists() for m in RUN_MARKERS):
            raise UserError(f"run directory {run_dir} is not empty and is not a vlfit run; choose another --run-dir")
        if not overwrite:
            raise UserError(f"run directory {run_dir} already holds a run; pass --overwrite to replace it "
                            "or choose another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def setup_logging() -> None:
    """Warnings and worse to the console (errors only from processes other than the main one, which
    would repeat its warnings); the run's own log file is written by the training loop."""
    from vlfit.distributed import process_index

    level = logging.WARNING if process_index() == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    # On the handler too: the run's log file lowers vlfit's logger to INFO, and those records must
    # reach the file, not the console under the epoch table.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    # transformers' own weight-loading reports and bars would drown the epoch table.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def echo(message: str = "", **kwargs) -> None:
    """click.echo in the main process only: under a launcher every process runs the command."""
    from vlfit.distributed import process_index

    if process_index() == 0:
        click.echo(message, **kwargs)


def report_error(err: UserError) -> None:
    """Print a UserError once: by the main process, or by another one that alone knows it (prefixed
    with its rank). An error every process meets alike (a config, a signal) is the main one's to say."""
    from vlfit.distributed import joined, process_index

    rank = process_index()
    if err.quiet or (rank != 0 and (err.everywhere or not joined())):
        return
    click.echo(f"{f'[process {rank}] ' if rank else ''}{err.prefix}: {err}", err=True)


def main() -> None:
    """Entry point: run the CLI, turning user errors into one message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlfit.distributed import leave_processes

    try:
        cli.main(standalone_mode=False)
        leave_processes()
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        report_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
