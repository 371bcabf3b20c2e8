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
        path = self.workdir / "metrics.jsonl"
        self._records = (sum(_step_of(line) is not None
                             for line in path.read_text(encoding="utf-8").splitlines())
                         if path.exists() else 0)
        self._jsonl = open(path, "a", encoding="utf-8")
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
        self._records += 1
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float):
                    if not math.isnan(value):
                        self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def records_written(self) -> int | None:
        """How many records metrics.jsonl holds now (None off process 0): saved with each
        checkpoint so that a resume can cut the file back to exactly that point."""
        return self._records if self.active else None

    def truncate_after(self, step: int, *, records: int | None = None) -> int:
        """Drops what a resumed run will log again; returns how many lines went.

        Call it right after resuming from the checkpoint of `step` (0 for a fresh start): a
        killed run logged past its last checkpoint, and the resumed run logs it again.
        `records` (`records_written()` when that checkpoint was saved) keeps exactly the
        records written before the save, so records of `step` itself logged after it (a final
        evaluation) go too; without it, the records with step > `step` go. A line cut short
        by the kill is dropped too. TensorBoard gets the same cut (tensorboardX `purge_step`).
        """
        if not self.active:
            return 0
        self._jsonl.flush()
        path = self.workdir / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if records is not None:
            keep = [line for line in lines if _step_of(line) is not None][:records]
        dropped = sum(1 for line in lines if line.strip()) - len(keep)
        if dropped:
            self._jsonl.close()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            tmp.replace(path)
            self._jsonl = open(path, "a", encoding="utf-8")
            self._records = len(keep)
            if self._tb is not None:
                from tensorboardX import SummaryWriter

                self._tb.close()
                self._tb = SummaryWriter(str(self.workdir / "tb"), purge_step=int(step) + 1)
        return dropped

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


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank or cut-short one."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl file (helper for tests and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
