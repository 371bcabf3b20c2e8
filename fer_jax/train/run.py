"""`Run`: one training run's workdir (config.json, metrics, checkpoints) and its final report.

A driver opens a Run, restores from it, saves into it, and ends with `finish`, which writes
eval.json, the learning curve, and prints one summary line a newcomer can judge: the headline
metric next to its chance level and where the outputs are. Only process 0 writes files.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from absl import logging

from fer_jax import data as data_lib
from fer_jax import federated as fl
from fer_jax.data import partition as partition_lib
from fer_jax.evaluation import plots
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.io.metrics import MetricWriter, read_jsonl

METRICS_RECORDS = "metrics_records"  # Checkpoint metadata: metrics.jsonl records at the save.


class Run:
    """The workdir of one run. `every`: checkpoint period in steps (or rounds); default
    config.checkpoint_every_steps when config.mode is 'centralized', else _every_rounds."""

    def __init__(self, config, workdir: str | pathlib.Path, *, every: int | None = None):
        if every is None:
            every = (config.checkpoint_every_steps if config.get("mode") == "centralized"
                     else config.checkpoint_every_rounds)
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.writer = MetricWriter(self.workdir)
        self.writer.write_json("config.json", config.to_dict())
        self.checkpointer = Checkpointer(self.workdir, every_steps=every,
                                         max_to_keep=config.get("keep_checkpoints", 2))

    def load_data(self):
        """(dataset, train, test, val or None) of config.data, logged."""
        data = self.config.data
        dataset = data_lib.load(data)
        train, test = dataset[data.train_split], dataset[data.eval_split]
        val = dataset[data.val_split] if data.get("val_split") else None
        logging.info("dataset %s: classes %s, train %d, eval %d", dataset.name,
                     dataset.class_names, len(train), len(test))
        return dataset, train, test, val

    def population(self, train, num_classes: int):
        """(ArrayPopulation of {'image', 'label'} clients, partition summary): the training
        split cut into clients as config.fed asks; the summary goes to partition.json."""
        parts = partition_lib.from_config(self.config.fed, train, seed=self.config.seed,
                                          dataset_name=self.config.data.name)
        summary = parts.summary(train.labels, num_classes)
        self.writer.write_json("partition.json", summary)
        population = fl.ArrayPopulation.from_clients(
            [{"image": train.images[i], "label": train.labels[i].astype(np.int32)}
             for i in parts.client_indices])
        logging.info("%d clients (sizes %s)", population.num_clients, summary["sizes"])
        return population, summary

    def restore(self, state, *, place=None, unit: str = "step"):
        """(state, start): the latest intact checkpoint (put on devices by `place`) or
        (state, 0); metrics.jsonl is cut back to `start`."""
        state, start = self.checkpointer.restore_or(state)
        self.truncate_metrics(start)
        if start:
            state = place(state) if place is not None else state
            logging.info("resumed from the checkpoint of %s %d in %s", unit, start,
                         self.checkpointer.directory)
        return state, start

    def truncate_metrics(self, start: int) -> None:
        """Cuts metrics.jsonl back to what was logged before the checkpoint of `start` was
        saved (all of it for 0): a killed run logged past it, and the resumed run logs it
        again, evaluations of `start` itself included."""
        records = self.checkpointer.metadata(start).get(METRICS_RECORDS) if start else None
        self.writer.truncate_after(start, records=records)

    def save(self, step: int, state, *, final: bool = False) -> None:
        """Saves a checkpoint when `step` is due (or `final`), recording how far metrics.jsonl
        had got."""
        if final or self.checkpointer.should_save(step):
            records = self.writer.records_written()
            self.checkpointer.save(step, state, metadata=None if records is None
                                   else {METRICS_RECORDS: records})

    def nonfinite(self, what: str) -> FloatingPointError:
        """The error for a NaN/inf by `what`, naming the checkpoint a rerun resumes from."""
        return FloatingPointError(f"{what}; stopping: lower the learning rate or check the "
                                  f"data. {self.checkpointer.describe_last_good()}")

    def finish(self, results: dict, *, metric: str, value: float, chance: float | None = None,
               detail: str = "", panels=None) -> dict:
        """Writes eval.json and learning_curve.png, prints the summary line, closes the run.

        panels: for a run whose stages share the step axis, the learning curve's subplots
        (`plots.save_panels`); default: training loss and evaluations over steps or rounds.
        """
        self.writer.write_json("eval.json", results)
        files = ["eval.json", "metrics.jsonl"]
        metrics_path = self.workdir / "metrics.jsonl"
        if self.writer.active and metrics_path.exists():
            name = f"{self.config.get('experiment', '')} ({self.config.get('mode', '')})"
            title = f"{name} on {self.config.data.name}"
            if panels:
                plots.save_panels(read_jsonl(metrics_path), panels,
                                  self.workdir / "learning_curve.png", title=title)
            else:
                data = self.config.data
                splits = {"eval": data_lib.split_label(data.name, data.eval_split)}
                if data.get("val_split"):
                    splits["val"] = data_lib.split_label(data.name, data.val_split)
                plots.save_learning_curve(read_jsonl(metrics_path),
                                          self.workdir / "learning_curve.png", title=title,
                                          chance=chance, split_names=splits)
            files.append("learning_curve.png")
        files += sorted(p.name for p in self.workdir.glob("*.png") if p.name not in files)
        vs = f" (chance {chance:.3f})" if chance is not None else ""
        summary = (f"{metric} {value:.4f}{vs}{detail}. Outputs in {self.workdir}: "
                   f"{', '.join(files)}")
        logging.info("%s", summary)
        if jax.process_index() == 0:
            print(summary, flush=True)
        self.close()
        return results

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()
