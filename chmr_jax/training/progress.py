"""A dependency-free progress reporter: a live bar on a terminal, plain log lines otherwise.

Used by long work (featurization, downloads, training) so that a user always sees the rate and
the time left. On a non-interactive stream (CI, a log file) it prints one line at most every
`log_every_s` seconds plus a final line, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import IO


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts work items and reports rate and ETA.

    Usage: `with Progress(total, "featurize") as bar: ...; bar.update(n)`.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it",
                 stream: IO[str] | None = None, log_every_s: float = 10.0,
                 enabled: bool = True, interactive: bool | None = None, initial: int = 0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.log_every_s = log_every_s
        self.enabled = enabled
        self.count = self.initial = initial   # initial: work already done (a resumed run)
        self.start = time.perf_counter()
        self._last_print = 0.0
        self.postfix = ""   # e.g. the current loss, appended to each line
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return (self.count - self.initial) / max(self.elapsed, 1e-9)

    def _line(self) -> str:
        return self._core() + (f" {self.postfix}" if self.postfix else "")

    def _core(self) -> str:
        rate = self.rate()
        if self.total:
            frac = min(self.count / self.total, 1.0)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_s = _fmt_seconds(eta) if eta != float("inf") else "?"
            bar = "#" * int(frac * 24)
            return (f"{self.desc}: [{bar:<24}] {self.count}/{self.total} {frac:6.1%} "
                    f"{rate:,.1f} {self.unit}/s elapsed {_fmt_seconds(self.elapsed)} eta {eta_s}")
        return f"{self.desc}: {self.count} {self.unit} {rate:,.1f} {self.unit}/s elapsed {_fmt_seconds(self.elapsed)}"

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_print >= 0.1:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self._last_print = now
        elif now - self._last_print >= self.log_every_s and self.count != self.total:
            # (the final count is written once, by close())
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        if not self.enabled:
            return
        prefix = "\r" if self.interactive else ""
        self.stream.write(prefix + self._line() + "\n")
        self.stream.flush()
        self.enabled = False
