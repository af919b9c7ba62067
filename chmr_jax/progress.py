"""Progress of long work (featurization, downloads, embedding, training) through tqdm: a live bar on a
terminal, plain log lines otherwise.

On a non-interactive stream (CI, a log file) tqdm's carriage-return redraws would fill the log, so
there the same tqdm-formatted line is printed at most every `log_every_s` seconds plus a final line.
`restart_clock` lets the training loop measure the rate and ETA from the first compiled step on.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm


class Progress:
    """Counts work items and reports rate and ETA.

    Usage: `with Progress(total, "featurize") as bar: ...; bar.update(n)`; `bar.postfix = "loss 1.2"`
    appends to every line. initial: work already done (a resumed run), excluded from the rate.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it",
                 stream: IO[str] | None = None, log_every_s: float = 10.0,
                 enabled: bool = True, interactive: bool | None = None, initial: int = 0,
                 unit_scale: bool = False):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.stream = stream if stream is not None else sys.stderr
        self.log_every_s = log_every_s
        self.enabled = enabled
        self._count = self.initial = initial      # the count when there is no live bar (tqdm's n otherwise)
        self.start = time.perf_counter()
        self._last_print = 0.0
        self.postfix = ""
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        # smoothing=0: the rate is the average since the clock (re)started, not a moving estimate.
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, file=self.stream,
                         smoothing=0,
                         dynamic_ncols=True, leave=True) if enabled and interactive else None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def count(self) -> int:
        """Work items done (resumed ones included): one counter, tqdm's own where a live bar exists."""
        return self._bar.n if self._bar is not None else self._count

    def restart_clock(self, count: int | None = None) -> None:
        """Rate and ETA from now on, over the work after `count` (default: what is done so far)."""
        self.start = time.perf_counter()
        done = self.count                        # the count itself is unchanged: only the rate's origin moves
        self.initial = done if count is None else count
        if self._bar is not None:
            # tqdm's public API: reset() restarts its clock at 0 items; `n` (its documented counter) gets
            # the work done back, `initial` (a constructor argument) the part left out of the rate.
            self._bar.reset(total=self.total)
            self._bar.initial, self._bar.n = self.initial, done
            self._bar.refresh()

    def line(self) -> str:
        """The tqdm-formatted status (ASCII, for logs): description, bar, count, rate, elapsed, ETA, postfix."""
        return tqdm.format_meter(self.count, self.total, time.perf_counter() - self.start, ncols=100,
                                 prefix=self.desc, unit=self.unit, unit_scale=self.unit_scale, ascii=True,
                                 initial=self.initial, postfix=self.postfix or None)

    def update(self, n: int = 1) -> None:
        if self._bar is None:
            self._count += n
        if not self.enabled:
            return
        if self._bar is not None:
            if self.postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_print >= self.log_every_s and self.count != self.total:
            # (the final count is written once, by close())
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if self.postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.close()
        else:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        self.enabled = False
