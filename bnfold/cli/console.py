"""Where human text goes, and progress on long work.

Text goes to stdout (stderr when ``--json -`` owns stdout), nothing but the final line and errors
with ``--quiet``. When the stream is not a terminal it is plain text, byte for byte what the
renderers give; on a terminal, tables are drawn and the final PASSED/FAILED word coloured by
rich (imported only then; no colour with ``NO_COLOR``). A rich progress display runs on stderr
while models are processed, only when stderr is a terminal (and not under CI or ``--quiet``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from bnfold.errors import printable

from .render.text import Block, Table, plain


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Console:
    """The output channels of one command run."""

    def __init__(self, quiet: bool = False, json_stdout: bool = False) -> None:
        self.quiet = quiet
        self.json_stdout = json_stdout

    @property
    def out(self) -> TextIO:
        return sys.stderr if self.json_stdout else sys.stdout

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    def lines(self, blocks: list[Block]) -> None:
        """Body text: suppressed by --quiet. Names from a model cannot break lines or send
        terminal escapes: control characters are escaped."""
        if self.quiet or not blocks:
            return
        stream = self.out
        if isatty(stream):
            _rich_blocks(stream, blocks)
        else:
            self._write(stream, "\n".join(printable(line) for line in plain(blocks)))

    def final(self, line: str) -> None:
        """The greppable PASSED/FAILED line: kept by --quiet unless --json - owns stdout."""
        if self.quiet and self.json_stdout:
            return
        line = printable(line)
        stream = self.out
        word, _, rest = line.partition(" ")
        color = {"PASSED": "green", "FAILED": "red"}.get(word)
        if color and isatty(stream) and not os.environ.get("NO_COLOR"):
            from rich.text import Text

            text = Text.assemble((word, f"bold {color}"), " " + rest)
            _rich_console(stream).print(text, soft_wrap=True)
            stream.flush()
        else:
            self._write(stream, line)

    def warn(self, text: str) -> None:
        if not self.quiet:
            self._write(sys.stderr, f"bnfold: warning: {printable(text)}")

    def error(self, text: str) -> None:
        """One line on stderr, always (even with --quiet)."""
        self._write(sys.stderr, f"bnfold: error: {printable(text)}")


def _rich_console(stream: TextIO) -> Any:
    from rich.console import Console as RichConsole

    return RichConsole(file=stream, force_terminal=True, highlight=False, markup=False, emoji=False)


def _rich_blocks(stream: TextIO, blocks: list[Block]) -> None:
    from rich.padding import Padding
    from rich.table import Table as RichTable
    from rich.text import Text

    console = _rich_console(stream)
    for block in blocks:
        if isinstance(block, Table):
            table = RichTable(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
            header, *rows = block.rows
            for name in header:
                table.add_column(Text(printable(name)), no_wrap=True)
            for row in rows:
                table.add_row(*(Text(printable(cell)) for cell in row))
            console.print(Padding(table, (0, 0, 0, len(block.indent)), expand=False))
        else:
            console.print(Text(printable(block)), soft_wrap=True)
    stream.flush()


class Progress:
    """What a command tells the progress display: the model being worked on, its step, and
    models finished."""

    def __init__(self, bar: Any, task: Any, total: int) -> None:
        self.bar, self.task, self.total = bar, task, total
        self.done = self.failed = 0
        self.label = ""

    def set_label(self, label: str) -> None:
        self.label = label
        self._show("")

    def step(self, name: str) -> None:
        self._show(name)

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self.bar.update(self.task, completed=self.done)
        self._show("")

    def _show(self, step: str) -> None:
        if self.total > 1:
            text = f"{self.done}/{self.total} models" + (f", {self.failed} failed" if self.failed else "")
        else:
            text = f"{printable(self.label)}: {step or 'working'}..."
        self.bar.update(self.task, description=text)


@contextmanager
def progress(console: Console, total: int, label: str) -> Iterator[Progress | None]:
    """A transient progress display on stderr when it is a terminal, else None."""
    if console.quiet or not isatty(sys.stderr) or os.environ.get("CI"):
        yield None
        return
    from rich.console import Console as RichConsole
    from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total > 1:
        columns.insert(1, BarColumn())
    columns.append(TimeElapsedColumn())
    with RichProgress(*columns, console=RichConsole(file=sys.stderr), transient=True) as bar:
        handle = Progress(bar, bar.add_task("", total=total), total)
        handle.set_label(label)
        yield handle
