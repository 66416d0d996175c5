"""Progress of the long loops (features, epochs, test), one helper shared by every command.

On a terminal the user sees a tqdm bar updated in place. When stderr is not a terminal (a log
file, a pipe, CI, a notebook) carriage-return updates would pile up into one unreadable line, so
progress is written as plain lines instead: at most one every ``interval`` seconds, and a last one
when the loop ends (if ``leave``). ``enabled=False`` shows nothing.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_INTERVAL_S = 10.0


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True,
             leave: bool = True, file=None, interval: float = LINE_INTERVAL_S):
    """A progress reporter with tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``)."""
    file = file if file is not None else sys.stderr
    if not enabled or _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file, disable=not enabled)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file, interval=interval)


def _is_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """Progress as whole lines: ``desc: n/total unit (p%) in t s, key=value``."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", leave=True, file=None,
                 interval: float = LINE_INTERVAL_S):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.written = None  # the count of the last line written
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._write()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.written != self.n:
            self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share} in {self.last - self.start:.1f}s{extra}",
              file=self.file, flush=True)
        self.written = self.n
