"""A small progress bar for long loops (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`[#####-----] 120/450 loss 0.31 3.2 it/s` on one terminal line, redrawn at most
    every `interval` seconds. Silent when `enabled` is False.

    By default (`enabled=None`) it draws the bar on a terminal; on any other stream
    (a log file, a pipe) it writes that line as a plain line once every
    `log_interval` seconds, so a long background run shows its rate without filling
    its log (a loop that ends sooner writes nothing)."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        stream=None,
        width: int = 24,
        interval: float = 0.2,
        log_interval: float = 60.0,
        initial: int = 0,
    ):
        self.total, self.desc, self.width, self.interval = total, desc, width, interval
        self.stream = sys.stderr if stream is None else stream
        self.lines = enabled is None and not _isatty(self.stream)
        self.enabled = True if enabled is None else bool(enabled)
        if self.lines:
            self.interval = log_interval
        # A resumed loop starts at `initial`; the rate counts this session's items only.
        self.n = self.initial = initial
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        now = time.perf_counter()
        if self.lines:
            if now - self.start >= self.interval and now - self._last >= self.interval:
                self._last = now
                self.stream.write(self._line(now, postfix).lstrip("\r") + "\n")
                self.stream.flush()
        elif self.enabled and (now - self._last >= self.interval or self.n >= self.total):
            self._last = now
            self.stream.write(self._line(now, postfix))
            self.stream.flush()
            self._shown = True

    def _line(self, now: float, postfix: dict) -> str:
        frac = min(1.0, self.n / self.total) if self.total else 1.0
        filled = int(round(frac * self.width))
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        extra = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items()
        )
        return (
            f"\r{self.desc} [{'#' * filled}{'-' * (self.width - filled)}] "
            f"{self.n}/{self.total} {extra} {rate:.3g} it/s"
        )

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
