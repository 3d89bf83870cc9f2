"""Errors a user can cause. The CLI prints their message and exits with code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data, paths or machine, explained in plain words."""

    exit_code = 2
    prefix = "error"  # how the CLI introduces the message
    everywhere = False  # every process meets it alike (under a launcher): the main process alone reports it
    quiet = False  # already reported (by another process): say nothing


class ConfigError(UserError):
    """One or more problems in a config; each problem is one line naming its key."""

    everywhere = True

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), without a closing full
    stop, for one-line reports."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__).rstrip(".")
