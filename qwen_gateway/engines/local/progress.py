"""Progress of slow start-up work: live bars on an interactive terminal, a few plain lines otherwise.

On a terminal each step is a row with a spinner, its count (tensors, files) when it has one, elapsed
time and an ETA. Anywhere else (logs, CI, pipes, ``docker logs``) there is no live display at all: one
plain line per finished step with its count and duration, so a log records where the time went and
never fills with carriage returns or cursor-control sequences.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")


class _Count(ProgressColumn):
    """``done/total`` for a step that counts something; blank for one that does not (no ``0/?``)."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("counted") or task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")


class Step:
    """One step of a :class:`Steps` display; ``advance`` moves its count on."""

    def __init__(self, steps: Steps, name: str, total: int | None, task: TaskID | None) -> None:
        self._steps = steps
        self.name = name
        self.total = total
        self.done = 0
        self._task = task

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self._task is not None and self._steps.live is not None:
            self._steps.live.update(self._task, advance=amount)


class Steps:
    """A titled sequence of steps, shown live on a terminal and as plain lines elsewhere."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.live: Progress | None = None

    def __enter__(self) -> Steps:
        self.console.print(escape(self.title))
        if self.console.is_terminal:
            self.live = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                _Count(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Step]:
        """A step; on a terminal its row stays (ticked) once it ends, elsewhere one line is printed."""
        task = None
        if self.live is not None:
            task = self.live.add_task(escape(name), total=total, counted=total is not None)
        step = Step(self, name, total, task)
        started = time.monotonic()
        try:
            yield step
        finally:
            seconds = time.monotonic() - started
            # (Its name as the step left it: a step may learn what it did, e.g. found a shared load.)
            if self.live is not None and task is not None:
                # A step without a count still ends as a full bar, not a spinner left pulsing.
                self.live.update(
                    task, description=escape(step.name), total=max(step.done, 1), completed=max(step.done, 1)
                )
            else:
                count = f" ({step.done}/{total})" if total else (f" ({step.done})" if step.done else "")
                self.console.print(f"  {escape(step.name)}{count}: {seconds:.1f} s", highlight=False)

    def track(self, iterable: Iterable[T], name: str, total: int | None = None) -> Iterator[T]:
        """Iterate ``iterable`` as one step whose count advances per item."""
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with self.step(name, total) as step:
            for item in iterable:
                yield item
                step.advance()


@contextlib.contextmanager
def progress(console: Console, message: str) -> Iterator[None]:
    """A single step with no count: a spinner on a terminal, one plain line otherwise."""
    if console.is_terminal:
        with console.status(escape(message)):
            yield
    else:
        console.print(escape(message))
        yield
