"""A small progress bar for long loops (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`[#####-----] 120/450 loss 0.31 3.2 it/s` on one terminal line, redrawn at most
    every `interval` seconds. Silent when `enabled` is False (default: only when the
    stream is a terminal, so logs and tests stay clean)."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        stream=None,
        width: int = 24,
        interval: float = 0.2,
    ):
        self.total, self.desc, self.width, self.interval = total, desc, width, interval
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.n = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.n >= self.total):
            self._last = now
            self._draw(now, postfix)

    def _draw(self, now: float, postfix: dict) -> None:
        frac = min(1.0, self.n / self.total) if self.total else 1.0
        filled = int(round(frac * self.width))
        rate = self.n / max(now - self.start, 1e-9)
        extra = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items()
        )
        line = (
            f"\r{self.desc} [{'#' * filled}{'-' * (self.width - filled)}] "
            f"{self.n}/{self.total} {extra} {rate:.1f} it/s"
        )
        self.stream.write(line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
