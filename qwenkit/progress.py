"""Progress bars for long waits (downloads, loading, training, evaluation), on stderr only."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn


def bars_enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and QWENKIT_NO_PROGRESS is unset."""
    return os.environ.get("QWENKIT_NO_PROGRESS", "") in ("", "0") and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: float, *, bytes_: bool = False, show: bool = True):
    """Yields `advance(n=1, description=None)` (a new description replaces the bar's label, e.g. to show a
    running loss); draws a transient bar when stderr is a terminal and `show` is true."""
    if not (show and bars_enabled()):
        yield lambda n=1, description=None: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(),
               DownloadColumn() if bytes_ else TextColumn("{task.completed:.0f}/{task.total:.0f}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1, description=None: bar.update(
            task, advance=n, **({"description": description} if description else {}))
