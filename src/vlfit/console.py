"""The console view of a run: a table that grows by one row per epoch, under a progress bar."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# (metrics.jsonl key, column title, format)
COLUMNS = [
    ("epoch", "epoch", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("train_acc", "train acc", "{:.3f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_acc", "val acc", "{:.3f}"),
    ("epoch_time_s", "time (s)", "{:.1f}"),
    ("train_images_per_s", "img/s", "{:.0f}"),
    ("peak_mem_mb", "peak mem (MB)", "{:.0f}"),
    ("lr", "lr", "{:.2e}"),
]


def format_row(record: dict[str, Any]) -> list[str]:
    return [fmt.format(record[key]) for key, _, fmt in COLUMNS]


class EpochView:
    """Live table + progress bar on a terminal; plain lines, one per epoch, when output is a file or pipe."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console()
        self.enabled = enabled
        self.live_mode = enabled and self.console.is_terminal
        self.table = Table(*[title for _, title, _ in COLUMNS], title="epochs", title_justify="left")
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self._task = None
        self._live: Live | None = None
        self._printed_header = False

    def __enter__(self) -> EpochView:
        if self.live_mode:
            self._live = Live(Group(self.table, self.progress), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """Show a bar for `epoch`; `done` batches of it were trained before a resume."""
        if self._task is not None:
            self.progress.remove_task(self._task)
        self._task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, completed=done, info="")

    def advance(self, info: str = "") -> None:
        if self.live_mode:
            self.progress.update(self._task, advance=1, info=info)

    def add_row(self, record: dict[str, Any]) -> None:
        row = format_row(record)
        if self.live_mode:
            self.table.add_row(*row)
        elif self.enabled:
            widths = [max(len(title), 8) for _, title, _ in COLUMNS]
            if not self._printed_header:
                self._print_line([title for _, title, _ in COLUMNS], widths)
                self._printed_header = True
            self._print_line(row, widths)

    def _print_line(self, cells: list[str], widths: list[int]) -> None:
        line = " ".join(c.rjust(w) for c, w in zip(cells, widths))
        self.console.print(line, highlight=False, soft_wrap=True)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Send vlfit's log records (INFO and up) to `path` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("vlfit")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
