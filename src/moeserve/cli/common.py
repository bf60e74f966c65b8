"""What every subcommand shares: consoles, JSON output, progress bars."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from moeserve.cli import WIDE

# Human output goes to stderr so that `--json` output on stdout stays machine-readable; without a terminal
# it is laid out wide instead of cut at 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else int(os.environ.get("TERMINAL_WIDTH", WIDE)))


def emit_json(payload: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def emit_json_line(payload: Any) -> None:
    """Print one compact JSON object on one line of stdout (for line-reading scripts)."""
    sys.stdout.write(json.dumps(payload, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def progress(disable: bool = False) -> Progress:
    """A progress bar on stderr; `disable` for --json runs that must print nothing else."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=disable,
        transient=True,  # the bar disappears when done: the result (or the one-line error) is what stays
    )


class ProgressTicks:
    """Progress of long work: a live bar on a terminal, else (output redirected, CI, nohup) one log line
    per task every LOG_EVERY_S seconds, and when it completes if it ran that long. The display starts on
    the first tick and a log line only after LOG_EVERY_S, so a command that fails early prints nothing
    but its error line.

    with ProgressTicks(disable=json_out) as tick: core(..., progress=tick)   # tick(task, done, total, status)
    """

    LOG_EVERY_S = 10.0

    def __init__(self, disable: bool = False):
        self.disable, self._bar, self._tasks = disable, None, {}
        self._live = console.is_terminal
        self._logged: dict[str, float] = {}
        self._started = time.monotonic()

    def __call__(self, task: str, done: int, total: int | None, status: str = "") -> None:
        if self.disable:
            return
        if not self._live:
            now = time.monotonic()
            complete = total is not None and done >= total
            since = now - self._logged.setdefault(task, now)
            if since >= self.LOG_EVERY_S or (complete and now - self._started >= self.LOG_EVERY_S):
                self._logged[task] = now
                share = f" ({done / total:.0%})" if total else ""
                console.print(f"{task}: {done}/{total if total is not None else '?'}{share} {status} "
                              f"[{now - self._started:.0f} s]".rstrip(), highlight=False)
            return
        if self._bar is None:
            self._bar = progress().__enter__()
        if task not in self._tasks:
            self._tasks[task] = self._bar.add_task(task, total=total, status="")
        self._bar.update(self._tasks[task], total=total, completed=done, status=status)

    def __enter__(self) -> ProgressTicks:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
