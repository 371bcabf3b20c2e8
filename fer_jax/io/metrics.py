"""Metric writers: JSONL + TensorBoard event files + config.json, written by process 0 only."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
    """Appends `{'step': s, 'time': t, **metrics}` lines to `workdir/metrics.jsonl`.

    Scalars also go to TensorBoard (`workdir/tb/`). On processes other than 0 every call is a
    no-op, so multi-host runs can call it unconditionally.
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # Lazy: only process 0 needs it.

            self._tb = SummaryWriter(str(self.workdir / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float):
                    if not math.isnan(value):
                        self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def write_json(self, name: str, payload) -> None:
        """Writes `workdir/name` (e.g. 'config.json', 'eval.json'), pretty-printed."""
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / name).write_text(json.dumps(payload, indent=2, default=_scalar) + "\n")

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl file (helper for tests and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
