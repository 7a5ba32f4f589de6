"""What the CLI prints besides command output: warnings, notes, tables, spinners, the missing-template warning.

Command output goes to stdout (`emit`, `print_table`); everything else (warnings, progress, summaries) goes to
stderr, so piping a command's output never mixes in messages. The terminal is rich's: tables fit the real
terminal width, colour only in a terminal and never with NO_COLOR (rich honours both), spinners only when
stderr is a terminal (a log file gets no control characters).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console

from gallery.config import ModelConfig


def _terminal_width(stream: Any) -> int | None:
    """The width of the terminal a stream is, asked of the terminal itself (an exported $COLUMNS can be stale)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


def stdout_console() -> Console:
    """A console on stdout (rich decides colour from the terminal, NO_COLOR and TERM; the width is the terminal's)."""
    return Console(highlight=False, soft_wrap=False, width=_terminal_width(sys.stdout))


def stderr_console() -> Console:
    """A console on stderr."""
    return Console(stderr=True, highlight=False, soft_wrap=False, width=_terminal_width(sys.stderr))


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal."""
    return sys.stdout.isatty()


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (spinners and progress bars only then)."""
    return sys.stderr.isatty()


def warn(message: str) -> None:
    """Print a warning to stderr: one line in a log, wrapped to the width of a terminal."""
    stderr_console().print(
        f"[yellow]gallery: warning:[/yellow] {_escape(message)}", soft_wrap=not stderr_is_terminal()
    )


def note(message: str) -> None:
    """Print an informational message to stderr: one line in a log, wrapped to the width of a terminal."""
    stderr_console().print(f"[dim]gallery:[/dim] {_escape(message)}", soft_wrap=not stderr_is_terminal())


def emit(text: str) -> None:
    """Write command output to stdout."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, wrap: Sequence[str] = ()) -> None:
    """A plain table on stdout that fits the terminal: columns in `wrap` shrink and wrap their text onto more
    lines (between words where they can), the others do not.

    Cells are plain strings, or rich Text for a coloured cell.
    """
    from rich.table import Table

    console = stdout_console()
    widths = [
        max([len(header), *(len(str(row[index])) for row in rows)]) for index, header in enumerate(headers)
    ]
    if not stdout_is_terminal():  # piped: whole cells, for grep and scripts (--json is the stable form)
        console = Console(highlight=False, soft_wrap=False, width=max(80, sum(widths) + 2 * len(widths)))
    fixed = sum(w for h, w in zip(headers, widths, strict=True) if h not in wrap) + 2 * (len(headers) - 1)
    spare = max(8, (console.width - fixed) // max(1, len(wrap)))
    # Like `docker ps`: no rules, two spaces between columns, the header in bold.
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, show_edge=False, header_style="bold")
    for header, width in zip(headers, widths, strict=True):
        if header in wrap:  # only these give way to a narrow terminal: wrapped, never cut
            table.add_column(header, overflow="fold", max_width=min(width, spare))
        else:  # never shrink a name, a size or a revision
            table.add_column(header, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*[cell if not isinstance(cell, str) else _escape(cell) for cell in row])
    console.print(table)


@contextlib.contextmanager
def spinner(message: str) -> Iterator[Any]:
    """A spinner with the elapsed time on stderr while a long step runs (only in a terminal).

    Yields an object whose `update(text)` changes the message; rich's Progress draws the spinner and the clock
    on its own refresh thread, so the work in the block needs no cooperation.
    """
    if not stderr_is_terminal():
        yield _NoSpinner()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
    ) as progress:
        task = progress.add_task(_escape(message), total=None)
        yield _Spinner(progress, task)


@contextlib.contextmanager
def download_progress() -> Iterator[Any]:
    """One rich progress display on stderr for a download (only in a terminal; None when not).

    Yields a tqdm class for huggingface_hub's `tqdm_class`: every bar it opens (bytes, files) becomes a row of
    this one display instead of tqdm's own output, and the display disappears when the download ends, so no
    finished bar is drawn again after the command's own lines.
    """
    if not stderr_is_terminal():
        yield None
        return
    import io

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from tqdm.std import tqdm as std_tqdm

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
    ) as progress:

        class RichTqdm(std_tqdm):
            """A tqdm whose display is a task of the shared rich Progress (its own text goes nowhere)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._task: Any = None
                kwargs["file"] = io.StringIO()
                kwargs.pop("name", None)
                super().__init__(*args, **kwargs)

            def display(self, msg: str | None = None, pos: int | None = None) -> bool:
                if (self.desc or "").startswith(
                    "Reconstruct"
                ):  # the bytes written: the same as the bytes read
                    return True
                total = self.total or None
                if self.unit == "B":
                    amount = std_tqdm.format_sizeof(self.n, "B", 1024)
                    amount += f" / {std_tqdm.format_sizeof(total, 'B', 1024)}" if total else ""
                else:
                    amount = f"{self.n}/{total} files" if total else f"{self.n} files"
                description = _escape(self.desc or "downloading")
                if self._task is None:
                    self._task = progress.add_task(description, total=total, amount=amount)
                progress.update(
                    self._task, completed=self.n, total=total, description=description, amount=amount
                )
                return True

        yield RichTqdm


class _Spinner:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def update(self, message: str) -> None:
        self._progress.update(self._task, description=_escape(message))


class _NoSpinner:
    def update(self, message: str) -> None:
        pass


def template_warning(config: ModelConfig) -> str | None:
    """The one warning for a config without a usable chat template (None when it has one)."""
    template = config.mlx.chat_template
    if template.status == "pinned":
        return None
    why = (
        "none was found in the repo"
        if template.status == "missing"
        else f"the one in {template.source} is unusable"
    )
    return (
        f"{config.name} has no usable chat template ({why}): chat messages cannot be formatted the way the model "
        "was trained. Send a raw prompt with `--raw`, or pin a template: put a chat_template.jinja in the model "
        "folder and import it again, or set mlx.chat_template (text and sha256) in the config"
    )


_WARNED: set[str] = set()


def loud_template_warning(config: ModelConfig) -> None:
    """Warn once per process about a config without a usable chat template."""
    message = template_warning(config)
    if message is not None and config.name not in _WARNED:
        _WARNED.add(config.name)
        warn(message)
