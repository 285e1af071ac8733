"""Progress on the command line: each stage as it starts and ends, with its elapsed time.

::

    ▸ build_features …
    ✓ build_features  4.1 s
    ▸ score_partitions …
      score_partitions  3/8 partitions  38%  6.0 s
    ✗ check_scores  failed after 0.4 s: score PSI 0.41 above the limit 0.25

Nothing is shown unless a :class:`Reporter` is installed with :func:`reporting`: the CLI
installs one on stderr (stdout keeps the machine-readable output), unless ``--quiet``.
The pipeline may call :func:`stage` anywhere; from an Airflow task or a test it only
counts. On a terminal the stage line is redrawn in place with a bar; elsewhere (CI, logs,
pipes) every line is plain text, and a bar prints at most every ``every_fraction`` of its
work or ``every_seconds``. Colour only on a terminal, and never when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

BAR_WIDTH = 24
REDRAW_SECONDS = 0.1  # a terminal bar is redrawn at most this often
ERROR_CHARS = 200  # the failure line shows the error's first line, cut to this


def elapsed(seconds: float) -> str:
    """``12.3 s`` under a minute, ``4 min 05 s`` above."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def one_line(error: BaseException | str) -> str:
    """The first line of an error, shortened; the exception's type when it has no text."""
    text = str(error).strip()
    if isinstance(error, KeyboardInterrupt):
        text = "interrupted"
    elif not text and isinstance(error, BaseException):
        text = type(error).__name__
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= ERROR_CHARS else first[: ERROR_CHARS - 1] + "…"


class Stage:
    """A running stage: ``advance`` counts its work (units of ``total``) for the bar."""

    def __init__(
        self, name: str, total: int | None, unit: str, reporter: Reporter | None, began: float
    ):
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.began = began
        self.error: str | None = None
        self._reporter = reporter
        self._shown_decile = 0
        self._shown_at = began

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._reporter is not None:
            self._reporter._advanced(self)

    def fail(self, message: str) -> None:
        """End the stage as failed without raising (the caller reports the failure itself)."""
        self.error = message


class Reporter:
    """Writes stage lines to ``stream`` (thread-safe).

    Args:
        stream: where to write (the CLI passes stderr).
        interactive: redraw lines in place (carriage returns, ANSI); default: ``stream`` is a TTY.
        color: colour the marks; default: interactive and ``NO_COLOR`` unset or empty.
        clock: seconds, monotonic (tests pass a fake one).
        every_seconds, every_fraction: plain-text bar throttle: a line per this much time
            or share of the work, none in a stage's first ``grace_seconds`` (a quick stage
            shows only its start and end).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interactive: bool | None = None,
        color: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_seconds: float = 5.0,
        every_fraction: float = 0.1,
        grace_seconds: float = 1.0,
    ):
        self.stream = stream
        self.interactive = _isatty(stream) if interactive is None else interactive
        self.color = self.interactive and not os.environ.get("NO_COLOR") if color is None else color
        self.clock = clock
        self.every_seconds, self.every_fraction = every_seconds, every_fraction
        self.grace_seconds = grace_seconds
        self.began = clock()
        self.marks = _marks(stream)
        self._depth = 0
        self._pending: Stage | None = None  # interactive: its start line has no newline yet
        self._lock = threading.RLock()

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Stage]:
        with self._lock:
            current = Stage(name, total, unit, self, self.clock())
            self._start(current)
            self._depth += 1
        try:
            yield current
        except BaseException as exc:
            with self._lock:
                self._depth -= 1
                self._end(current, self.clock() - current.began, one_line(exc))
            raise
        with self._lock:
            self._depth -= 1
            self._end(current, self.clock() - current.began, current.error)

    def finished(self, name: str, seconds: float | None, error: str | None = None) -> None:
        """A stage timed elsewhere (another process) ended: one ✓ or ✗ line (no time if None)."""
        with self._lock:
            self._end(Stage(name, None, "", None, self.clock()), seconds, error)

    def note(self, text: str) -> None:
        """A line of its own at the current depth (a summary, a path, a hint)."""
        with self._lock:
            self._newline()
            for line in text.splitlines() or [""]:
                self._write(self._indent() + line + "\n")

    def _start(self, stage: Stage) -> None:
        self._newline()
        self._write(f"{self._indent()}{self.marks['start']} {stage.name} {self.marks['more']}")
        if self.interactive:
            self._pending = stage
        else:
            self._write("\n")

    def _end(self, stage: Stage, seconds: float | None, error: str | None) -> None:
        if error is None:
            mark, text = self._paint(self.marks["ok"], "32"), stage.name
            text += f"  {elapsed(seconds)}" if seconds is not None else ""
        else:
            mark = self._paint(self.marks["failed"], "31")
            after = f" after {elapsed(seconds)}" if seconds is not None else ""
            text = f"{stage.name}  failed{after}: {error}"
        if self._pending is stage:
            self._write("\r\x1b[K")
            self._pending = None
        else:
            self._newline()
        self._write(f"{self._indent()}{mark} {text}\n")

    def _advanced(self, stage: Stage) -> None:
        with self._lock:
            now = self.clock()
            if self.interactive:
                if self._pending is stage and (
                    now - stage._shown_at >= REDRAW_SECONDS or stage.done == stage.total
                ):
                    stage._shown_at = now
                    self._write("\r\x1b[K" + self._indent(-1) + self._bar(stage, now))
                return
            if now - stage.began < self.grace_seconds:
                return
            decile = int(stage.done / stage.total / self.every_fraction) if stage.total else 0
            if decile > stage._shown_decile or now - stage._shown_at >= self.every_seconds:
                stage._shown_decile, stage._shown_at = decile, now
                self._write(self._indent() + self._bar(stage, now) + "\n")

    def _bar(self, stage: Stage, now: float) -> str:
        took = elapsed(now - stage.began)
        unit = f" {stage.unit}" if stage.unit else ""
        if not stage.total:
            return f"{stage.name}  {stage.done:,}{unit}  {took}"
        share = min(1.0, stage.done / stage.total)
        counts = f"{stage.done:,}/{stage.total:,}{unit}"
        if not self.interactive:
            return f"{stage.name}  {counts}  {share:.0%}  {took}"
        filled = int(share * BAR_WIDTH)
        bar = self.marks["full"] * filled + self.marks["empty"] * (BAR_WIDTH - filled)
        return f"{self.marks['start']} {stage.name}  {bar}  {counts}  {took}"

    def _newline(self) -> None:
        if self._pending is not None:
            self._write("\n")
            self._pending = None

    def _indent(self, shift: int = 0) -> str:
        return "  " * max(0, self._depth + shift)

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _marks(stream: TextIO) -> dict[str, str]:
    fancy = {"start": "▸", "more": "…", "ok": "✓", "failed": "✗", "full": "█", "empty": "░"}
    try:
        "".join(fancy.values()).encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return {
            "start": ">",
            "more": "...",
            "ok": "ok",
            "failed": "FAILED",
            "full": "#",
            "empty": ".",
        }
    return fancy


_current: Reporter | None = None


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[Reporter | None]:
    """Show stages through ``reporter`` inside the block (``None``: show nothing)."""
    global _current
    previous, _current = _current, reporter
    try:
        yield reporter
    finally:
        _current = previous


def current() -> Reporter | None:
    """The installed reporter, if any."""
    return _current


@contextmanager
def stage(name: str, total: int | None = None, unit: str = "") -> Iterator[Stage]:
    """Show ``name`` starting and ending (with a bar when ``total`` units of work are known).

    Without an installed reporter the stage is only counted: nothing is written.
    """
    reporter = _current
    if reporter is None:
        yield Stage(name, total, unit, None, time.monotonic())
        return
    with reporter.stage(name, total, unit) as running:
        yield running


def note(text: str) -> None:
    """A line under the current stage, when a reporter is installed."""
    if _current is not None:
        _current.note(text)
