"""Progress of a batch: a rich progress bar for a person at a terminal, plain lines otherwise
(NO_COLOR, a redirected stdout or stderr). rich loads only when a bar is drawn."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from .cli_show import colour_enabled
from .models import BatchStatus, Status

PLAIN_EVERY_S = 2.0


class Progress:
    def __init__(self, batch_id: str, *, tty: bool | None = None) -> None:
        self.batch_id = batch_id
        self.tty = colour_enabled(sys.stderr) if tty is None else tty
        self._bar: Any = None  # rich.progress.Progress
        self._task: Any = None
        self._last_line = 0.0
        self._last_done = -1

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.markup import escape
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(escape(self.batch_id), total=None, detail="")
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(et, e, tb)

    def update(self, st: BatchStatus) -> None:
        failed = st.counts.get(Status.FAILED, 0) + st.counts.get(Status.CANCELLED, 0)
        detail = f"running {st.counts.get(Status.RUNNING, 0)} failed {failed}"
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=st.total, completed=st.done, detail=detail)
            return
        now = time.monotonic()
        if st.done != self._last_done and (now - self._last_line >= PLAIN_EVERY_S or st.finished):
            print(
                f"{self.batch_id}: {st.done}/{st.total} done, {detail}", file=sys.stderr, flush=True
            )
            self._last_line, self._last_done = now, st.done
