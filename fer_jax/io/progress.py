"""Progress reporting for long loops: a bar with ETA on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time

from absl import logging


class Progress:
    """Call `update(step, **scalars)` every step; prints at most every `min_interval_s` seconds.

    On a terminal (stderr is a tty) it redraws one line `[#####.....] 120/500 24% 3.1 it/s ETA
    2m03s loss=1.23`; in logs (CI, nohup, a cluster job) it writes the same text as an absl INFO
    line every `log_every_s` seconds, so the output stays readable when captured to a file.
    """

    def __init__(self, total: int, *, desc: str = "", start: int = 0, min_interval_s: float = 0.2,
                 log_every_s: float = 30.0, stream=None):
        self.total, self.desc, self.start = total, desc, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = min_interval_s if self.tty else log_every_s
        self._t0 = time.perf_counter()
        self._last = -float("inf")

    def text(self, step: int, scalars: dict) -> str:
        elapsed = time.perf_counter() - self._t0
        done = step - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        extra = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        return (f"{self.desc} [{bar}] {step}/{self.total} {100 * frac:3.0f}% {rate:.2f} it/s "
                f"ETA {_fmt(eta)} {extra}").strip()

    def update(self, step: int, **scalars) -> None:
        now = time.perf_counter()
        if now - self._last < self.interval and step < self.total:
            return
        self._last = now
        line = self.text(step, scalars)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step >= self.total else ""))
            self.stream.flush()
        else:
            logging.info("%s", line)


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet.
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
