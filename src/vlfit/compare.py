"""`vlfit compare`: train several configs one after another on the same data split, then report them
side by side.

Each run trains in its own `vlfit train` process, so no run's numbers carry another's state: on a
CPU the peak memory is the process's peak resident set size, which in a shared process would only
ever grow from one run to the next. Finished runs are skipped, so a comparison can be extended or
rerun cheaply; an unfinished one is taken up again through `resume_or_restart`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlfit.config import Config, load_config
from vlfit.errors import ConfigError, UserError
from vlfit.evaluate import EVAL_FILE, evaluate_run
from vlfit.report import MANIFEST, build_report

FINISHED = "summary.json"  # a run writes it last: its presence means the run finished
# Data keys that change how images are augmented or loaded, not which images are in the split.
NOT_SPLIT_KEYS = {"crop_scale", "crop_ratio", "hflip", "num_workers"}


@dataclass
class Planned:
    config: Path
    cfg: Config
    run_dir: Path


def compare(configs: list[Path], overrides: list[str], out: Path, say: Callable[[str], None] = print) -> Path:
    """Train every config that has no finished run in `out/<name>/`, check they share one split,
    and write the report to `out/report/`. Returns the path of report.html."""
    plans = plan(configs, overrides, out)
    for i, p in enumerate(plans, 1):
        state = run_state(p.run_dir, p.cfg)
        where = f"[{i}/{len(plans)}] {p.cfg.name}"
        if state == "finished":
            say(f"{where}: finished run in {p.run_dir}, skipped")
            continue
        extra: list[str] = []
        if state == "unfinished":
            extra = resume_or_restart(p.run_dir)
            say(f"{where}: {p.run_dir} holds an unfinished run; {'resuming' if '--resume' in extra else 'starting it again'}")
        else:
            say(f"{where}: training into {p.run_dir}")
        train_in_subprocess(p, overrides, extra)
    run_dirs = [p.run_dir for p in plans]
    check_same_split(run_dirs)
    for run_dir in run_dirs:
        if not (run_dir / EVAL_FILE).is_file():  # a run that finished before runs wrote eval.json
            say(f"scoring {run_dir}'s best checkpoint for the per-class results")
            evaluate_run(run_dir)
    (out / MANIFEST).write_text(json.dumps({"runs": [d.name for d in run_dirs],
                                            "configs": [str(p.config) for p in plans],
                                            "overrides": list(overrides)}, indent=1) + "\n")
    return build_report(run_dirs, out / "report")


def plan(configs: list[Path], overrides: list[str], out: Path) -> list[Planned]:
    """Every config resolved and checked before anything trains: distinct names, one data split."""
    if not configs:
        raise UserError("compare needs at least one config")
    plans = [Planned(path, load_config(path, list(overrides)), Path()) for path in configs]
    names = [p.cfg.name for p in plans]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two configs would both be run '{twice[0]}'; give them distinct `name:` values")
    if "report" in names:
        raise UserError("a config named 'report' would collide with the report folder; rename it")
    reference = split_identity(plans[0].cfg)
    for p in plans[1:]:
        differ = sorted(k for k in reference.keys() | split_identity(p.cfg).keys()
                        if reference.get(k) != split_identity(p.cfg).get(k))
        if differ:
            raise UserError(f"{p.config} and {plans[0].config} would train on different data splits "
                            f"(data.{', data.'.join(differ)} differ); a comparison needs one split")
    for p in plans:
        p.run_dir = out / p.cfg.name
    return plans


def split_identity(cfg: Config) -> dict:
    """The data keys that decide which images exist and which of them are held out."""
    return {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in NOT_SPLIT_KEYS}


def run_state(run_dir: Path, cfg: Config) -> str:
    """'absent', 'finished' or 'unfinished' for a run of `cfg` in `run_dir`. A folder that holds
    something else (not a run, or a run of another config) is a UserError: it is never replaced."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return "absent"
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} exists and is not a vlfit run; move it or choose another --out")
    try:
        existing = load_config(run_dir / "config.yaml")
    except ConfigError:
        existing = None
    if existing != cfg:
        raise UserError(f"{run_dir} holds a run of a different config than {cfg.name}'s now; "
                        "move it or choose another --out")
    return "finished" if (run_dir / FINISHED).is_file() else "unfinished"


def resume_or_restart(run_dir: Path) -> list[str]:
    """The `vlfit train` arguments that take up the unfinished run in `run_dir` again: it resumes
    from its newest good checkpoint and finishes as it would have without the interruption."""
    return ["--resume", str(run_dir)]


def train_in_subprocess(p: Planned, overrides: list[str], extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "vlfit", "train", str(p.config), *(a for o in overrides for a in ("--set", o)),
           "--run-dir", str(p.run_dir), *extra]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"training {p.cfg.name} failed (exit code {result.returncode}); its log is {p.run_dir / 'train.log'}")
    if not (p.run_dir / FINISHED).is_file():
        raise UserError(f"training {p.cfg.name} ended without writing {p.run_dir / FINISHED}")


def check_same_split(run_dirs: list[Path]) -> None:
    """All runs held out the same validation images (by id), as their split.json files record."""
    def ids(run_dir: Path) -> tuple[list[str], list[str]]:
        split = json.loads((run_dir / "split.json").read_text())
        return split["train"], split["val"]

    reference = ids(run_dirs[0])
    for run_dir in run_dirs[1:]:
        if ids(run_dir) != reference:
            raise UserError(f"{run_dir} and {run_dirs[0]} trained on different splits (see their split.json)")


def demo_configs() -> list[Path]:
    """Every config in configs/demo/ of the working directory, else of the clone vlfit runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        found = sorted((root / "configs" / "demo").glob("*.yaml"))
        if found:
            return [p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p for p in found]
    raise UserError("vlfit demo needs the configs/demo/ folder of a vlfit clone; run it from the clone's root")
