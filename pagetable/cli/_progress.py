"""A one-line progress bar for long subcommands, drawn on stderr only when it is a terminal.

Every redraw is ``\\r``, the line cut to one column less than the terminal is wide, and
clear-to-end-of-line.  A line as wide as the terminal would wrap on some terminals and
each redraw would then scroll; one column less never wraps.  ``close`` clears the line,
so that what the command prints next starts on a clean line and nothing is left behind.
When the stream is not a terminal (a pipe, a file, CI logs) nothing is written at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

CLEAR_TO_END = "\x1b[K"


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal behind ``stream``: ``$COLUMNS`` first, as ``shutil`` does, then
    the stream's own terminal (not stdout's, which may be a pipe), then 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``done`` of ``total`` units of work, with elapsed time and an estimate of what is left.

    Parameters
    ----------
    total : int
        Units of work in the whole run.
    unit : str
        What a unit is called ("steps", "timings").
    enabled : bool
        False draws nothing whatever the stream (``--quiet``).
    stream : text stream, optional
        Where to draw; ``sys.stderr`` when omitted.
    interval : float
        Least seconds between two redraws (the last one is always drawn).
    """

    def __init__(self, total: int, unit: str = "", enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.total = max(int(total), 0)
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and _is_terminal(self.stream)
        self.interval = interval
        self.start = time.perf_counter()
        self.last_draw = -float("inf")
        self.drawn = False
        self.done = 0

    def line(self, done: int, text: str, width: int) -> str:
        """The line for ``done`` units, at most ``width - 1`` characters."""
        elapsed = time.perf_counter() - self.start
        if 0 < done < self.total:
            left = f"ETA {_duration(elapsed * (self.total - done) / done)}"
        elif done >= self.total:
            left = "done"
        else:
            left = "ETA ?"
        counts = f"{done}/{self.total}" + (f" {self.unit}" if self.unit else "")
        tail = f" {counts} {_duration(elapsed)} {left}" + (f" {text}" if text else "")
        # The bar takes what the figures leave, between 10 and 30 columns.
        bar_width = max(10, min(30, width - 1 - len(tail) - 2))
        filled = bar_width * min(done, self.total) // max(self.total, 1)
        line = "[" + "#" * filled + "-" * (bar_width - filled) + "]" + tail
        return line[:max(width - 1, 0)]

    def update(self, done: int, text: str = "") -> None:
        """Redraw for ``done`` units finished (at most every ``interval`` seconds)."""
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_draw < self.interval and done < self.total:
            return
        self.last_draw = now
        self.stream.write("\r" + self.line(done, text, terminal_width(self.stream)) + CLEAR_TO_END)
        self.stream.flush()
        self.drawn = True

    def advance(self, text: str = "") -> None:
        """One more unit finished; ``text`` says which."""
        self.done += 1
        self.update(self.done, text)

    def close(self) -> None:
        """Erase the bar (idempotent)."""
        if self.drawn:
            self.stream.write("\r" + CLEAR_TO_END)
            self.stream.flush()
            self.drawn = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # closed, or not a real stream
        return False
