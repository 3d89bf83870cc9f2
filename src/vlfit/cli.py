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
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the run (default: runs/NAME-TIMESTAMP).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
def train(config: Path, overrides: tuple[str, ...], run_dir: Path | None, overwrite: bool) -> None:
    """Train and evaluate every epoch, as CONFIG (YAML) says."""
    from vlfit.config import load_config

    cfg = load_config(config, list(overrides))
    run_dir = run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_run_dir(run_dir, overwrite)
    setup_logging()

    from vlfit.train import train as run_training

    summary = run_training(cfg, run_dir)
    click.echo(f"best val_acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), "
               f"mean epoch {summary['mean_epoch_time_s']:.1f} s, peak memory {summary['peak_mem_mb']:.0f} MB "
               f"({summary['mem_kind']}); run in {run_dir}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
def validate(config: Path, overrides: tuple[str, ...]) -> None:
    """Check CONFIG and print it fully resolved, without loading data or models."""
    from vlfit.config import load_config

    click.echo(load_config(config, list(overrides)).to_yaml(), nl=False)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@overrides_option
def zeroshot(config: Path, overrides: tuple[str, ...]) -> None:
    """Score the zero-shot classifier (class prompts through the text tower) on CONFIG's validation split."""
    from vlfit.config import load_config
    from vlfit.zeroshot import zeroshot as run_zeroshot

    setup_logging()
    r = run_zeroshot(load_config(config, list(overrides)))
    click.echo(f"zero-shot {r['backbone']}: val_acc {r['val_acc']:.4f}, val_loss {r['val_loss']:.4f} "
               f"({r['images']} images, {r['classes']} classes)")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
def eval_(run_dir: Path, checkpoint: str) -> None:
    """Reload a run's checkpoint and score it on the run's validation split."""
    from vlfit.evaluate import evaluate_run

    r = evaluate_run(run_dir, checkpoint)
    click.echo(f"{checkpoint} checkpoint (epoch {r['epoch']}): val_acc {r['val_acc']:.4f} "
               f"(recorded {r['recorded_val_acc']:.4f}), val_loss {r['val_loss']:.4f}, {r['images']} images")


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
    """Warnings and worse to the console; the run's own log file is written by the training loop."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    # transformers' own weight-loading reports and bars would drown the epoch table.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    """Entry point: run the CLI, turning user errors into one message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
