"""Orbax checkpoints of a training state pytree, with resume from the latest step.

A run's state is one pytree (params, batch statistics, optimizer state, step, RNG key and, for
federated runs, the sampler state). Restoring it and replaying the deterministic data order from
the restored step reproduces an uninterrupted run bit for bit; `tests/test_resume.py` checks this,
including a process killed mid-run.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `state` every `every_steps` steps under `workdir/checkpoints`, keeps `max_to_keep`.

    Saving is synchronous: a checkpoint that `latest_step` reports is complete on disk, so a
    process killed at any moment leaves either the previous or the new checkpoint, never half of
    one (orbax writes to a temporary folder and renames it).
    """

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, max_to_keep: int = 2):
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps must be >= 1, got {every_steps}")
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state) -> None:
        """Writes `state` for `step` (replacing nothing: steps are unique)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """Restores the checkpoint at `step` (default: latest) into the structure of `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not have the structure of "
                "this run's state (was the model, optimizer or experiment changed since it was "
                "written?); use a fresh --workdir or the original config") from e

    def restore_or(self, like):
        """(state, step): the latest checkpoint if there is one, else (`like`, 0)."""
        step = self.latest_step()
        if step is None:
            return like, 0
        return self.restore(like, step), step

    def close(self) -> None:
        self._manager.close()


def _abstract(x):
    if isinstance(x, jax.Array | np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return x
