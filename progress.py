"""Progress of the long commands (export, quantize, eval, bench, compile) on stderr.

The library functions take a callback ``progress(done, total, what)``; ``what`` names the
phase, optionally with its unit after a colon: ``"calibrate:windows"``, ``"fit:tensors"``,
``"write"`` (a bar counts a phase without a unit in "steps"). A phase lasts while consecutive calls carry the same ``what``; each call
says how far that phase is (``done`` of ``total``, never more).

``task_progress`` turns those calls into

* on a terminal: one tqdm bar per phase (name, n/total, rate, time left), cleared when the
  phase ends, and one finished line at the end;
* elsewhere (a pipe, a log file, CI): no bars, only that one line at the end, e.g.
  ``quantizing: calibrate 8/8 windows, fit 122/122 tensors, write 3/3 — 41.2 s``.

On an error (or Ctrl-C) the bars are cleared and no line is printed: the caller reports
the error. The mode can be forced with ``mode=`` or ``EDGELLAMA_PROGRESS`` = ``bars`` |
``summary`` | ``off`` (``auto``, the default, picks by ``isatty``).

The command line uses this module; the runtime never imports it (nor tqdm, which is
imported here only when bars are drawn).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

Progress = Callable[[int, int, str], None]  # (done, total, what)

MODE_ENV = "EDGELLAMA_PROGRESS"
MODES = ("auto", "bars", "summary", "off")


def no_progress(done: int, total: int, what: str) -> None:
    """The library's default callback: nothing shown."""


def split_what(what: str) -> tuple[str, str | None]:
    """``"fit:tensors"`` -> ``("fit", "tensors")``; ``"layers"`` -> ``("layers", None)``."""
    phase, sep, unit = what.partition(":")
    return phase.strip(), (unit.strip() or None) if sep else None


def format_seconds(seconds: float) -> str:
    """``41.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class _Phase:
    __slots__ = ("what", "phase", "unit", "done", "total")

    def __init__(self, what: str, done: int, total: int):
        self.what = what
        self.phase, self.unit = split_what(what)
        self.done, self.total = done, total

    def __str__(self) -> str:
        count = f"{self.done}/{self.total}"
        return f"{self.phase} {count} {self.unit}" if self.unit else f"{self.phase} {count}"


class TaskProgress:
    """The ``(done, total, what)`` callback of one command; see the module's docstring.

    ``phases`` holds each phase's last count, in the order the phases began."""

    def __init__(self, label: str, mode: str | None = None, file: TextIO | None = None):
        mode = (mode or os.environ.get(MODE_ENV) or "auto").strip().lower()
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: choose one of {', '.join(MODES)}")
        self.file = file if file is not None else sys.stderr
        if mode == "auto":
            mode = "bars" if _isatty(self.file) else "summary"
        self.label, self.mode = label, mode
        self.phases: list[_Phase] = []
        self.started = time.perf_counter()
        self._bar = None
        self._closed = False

    def __call__(self, done: int, total: int, what: str) -> None:
        done, total = int(done), int(total)
        last = self.phases[-1] if self.phases else None
        if last is None or last.what != what:
            last = _Phase(what, done, total)
            self.phases.append(last)
            if self.mode == "bars" and not self._closed:
                self._new_bar(last)
        else:
            last.done, last.total = done, total
        if self._bar is not None:
            self._update_bar(last)

    # ---- the end ------------------------------------------------------------------------

    def summary(self) -> str:
        """``label: phase d/t unit, ... — 12.3 s``"""
        took = format_seconds(time.perf_counter() - self.started)
        if not self.phases:
            return f"{self.label} — {took}"
        return f"{self.label}: {', '.join(map(str, self.phases))} — {took}"

    def close(self, ok: bool = True) -> None:
        """Clear the bar; on success (and unless the mode is off) print the summary line once."""
        if self._closed:
            return
        self._closed = True
        self._close_bar()
        if ok and self.mode != "off" and self.phases:  # nothing reported, nothing done: no line
            line = self.summary()
            try:
                try:
                    print(line, file=self.file, flush=True)
                except UnicodeEncodeError:  # a strict ASCII / legacy-codepage stream
                    print(line.replace("\u2014", "-"), file=self.file, flush=True)
            except (OSError, ValueError):  # stderr closed or gone: nothing to tell
                pass

    # ---- bars (tqdm, imported here only) --------------------------------------------------

    def _new_bar(self, phase: _Phase) -> None:
        self._close_bar()
        from tqdm import tqdm

        self._bar = tqdm(total=max(phase.total, 0), desc=f"{self.label}: {phase.phase}",
                         unit=f" {phase.unit or 'steps'}", file=self.file, leave=False,
                         dynamic_ncols=True, mininterval=0.2, smoothing=0.1)

    def _update_bar(self, phase: _Phase) -> None:
        bar, total = self._bar, max(phase.total, 0)
        if phase.done < bar.n:  # the phase started over
            bar.reset(total=total)
        elif total != bar.total:
            bar.total = total
            bar.refresh()
        if phase.done > bar.n:
            bar.update(phase.done - bar.n)

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.close()
            except (OSError, ValueError):
                pass


@contextmanager
def task_progress(label: str, mode: str | None = None, file: TextIO | None = None) -> Iterator[TaskProgress]:
    """``with task_progress("quantizing") as progress: quantize_folder(..., progress)``

    Yields the callback (a TaskProgress). On success the summary line goes to `file`
    (default: stderr); on an exception the bars are cleared, nothing is printed and the
    exception propagates."""
    progress = TaskProgress(label, mode, file)
    try:
        yield progress
    except BaseException:
        progress.close(ok=False)
        raise
    progress.close(ok=True)


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False
