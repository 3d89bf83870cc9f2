"""The `vlfit` command: a thin layer over the library. User errors exit 2 with one clear message."""

from __future__ import annotations

import logging
import os
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
    from vlfit.config import load_config

    if resume_dir is not None:
        if overwrite or (run_dir is not None and run_dir != resume_dir):
            raise UserError("--resume RUN_DIR continues that run in place; it cannot be combined with "
                            "--overwrite or another --run-dir")
        if not (resume_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {resume_dir} is not a vlfit run directory (no config.yaml)")
        run_dir = resume_dir
    elif config is None:
        raise UserError("missing CONFIG: give a config file, or --resume RUN_DIR to continue a run")
    cfg = load_config(config if config is not None else run_dir / "config.yaml", list(overrides))
    if resume_dir is None:
        run_dir = run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        prepare_run_dir(run_dir, overwrite)
    setup_logging()

    from vlfit.train import train as run_training

    summary = run_training(cfg, run_dir, resume=resume_dir is not None)
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
    # A checkpoint taken part way through an epoch has no recorded validation score.
    recorded = "n/a" if r["recorded_val_acc"] is None else f"{r['recorded_val_acc']:.4f}"
    click.echo(f"{checkpoint} checkpoint (epoch {r['epoch']}): val_acc {r['val_acc']:.4f} "
               f"(recorded {recorded}), val_loss {r['val_loss']:.4f}, {r['images']} images")


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
        click.echo(f"{err.prefix}: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
