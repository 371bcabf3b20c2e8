"""Orbax checkpoints of a training state pytree, with resume from the latest intact step.

A run's state is one pytree (params, batch statistics, optimizer state, step, RNG key and, for
federated runs, the sampler state). Restoring it and replaying the deterministic data order from
the restored step reproduces an uninterrupted run bit for bit (`tests/test_main.py` checks this,
including a process killed mid-run; `benchmarks/fault_injection.py` kills runs at random moments).

Three guards make the kept checkpoints worth resuming from:
* a state with a NaN or Inf anywhere is never written (`NonFiniteStateError`), so "the last
  good checkpoint" of an error message is one that is finite (`describe_last_good`);
* a checkpoint that fails to read or holds non-finite values is reported in one log line, set
  aside under `checkpoints.set_aside/` and the previous intact one is used;
* `--restore_step` (env `FER_JAX_RESTORE_STEP`) chooses the step to resume from; newer steps are
  set aside, not deleted.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

RESTORE_STEP_ENV = "FER_JAX_RESTORE_STEP"
_FLAG_HINT = f"--restore_step=STEP (a flag of fer_jax.main; env {RESTORE_STEP_ENV})"


class NonFiniteStateError(FloatingPointError):
    """The state to save (or a restored one) holds NaN or Inf values."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of the workdir could be read back intact."""


class Checkpointer:
    """Saves `state` every `every_steps` steps under `workdir/checkpoints`, keeps `max_to_keep`.

    Saving is synchronous: a checkpoint that `latest_step` reports is complete on disk, so a
    process killed at any moment leaves either the previous or the new checkpoint, never half of
    one (orbax writes to a temporary folder and renames it). Every save and restore checks that
    the state is finite (one fused reduction on device, one host sync).

    `restore_step` (default: env FER_JAX_RESTORE_STEP, set by `fer_jax.main --restore_step`)
    makes `restore_or` resume from that step instead of the latest one.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, max_to_keep: int = 2,
                 restore_step: int | None = None):
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps must be >= 1, got {every_steps}")
        if max_to_keep < 1:
            raise ValueError(f"checkpoint max_to_keep (config keep_checkpoints) must be >= 1, "
                             f"got {max_to_keep}")
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.set_aside_directory = self.directory.with_name("checkpoints.set_aside")
        self.every_steps = every_steps
        self.restore_step = _env_restore_step() if restore_step is None else restore_step
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._largest = {}  # step -> largest |value|, for steps known to be finite.

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, *, metadata: dict | None = None) -> None:
        """Writes `state` for `step` (replacing nothing: steps are unique), with `metadata`
        (JSON values, read back by `metadata(step)`) in the same atomic write.

        Raises NonFiniteStateError, writing nothing, when any float leaf holds NaN or Inf.
        """
        if step in self._manager.all_steps():
            return
        bad, largest = finite_check(state)
        if bad:
            raise NonFiniteStateError(
                f"not writing the checkpoint of step {step}: non-finite values in "
                f"{_names(bad)}; {self.describe_last_good()}")
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                           custom_metadata={**(metadata or {}), "largest_abs": largest})
        self._manager.wait_until_finished()
        self._largest[step] = largest

    def restore(self, like, step: int | None = None):
        """Restores the checkpoint at `step` into the structure of `like`.

        step=None: the latest checkpoint that reads back intact and finite; newer ones that do
        not are reported, set aside and skipped. An explicit step that fails raises.
        """
        if step is not None:
            return self._restore_checked(like, step)
        return self._restore_latest_intact(like)[0]

    def restore_or(self, like, *, step: int | None = None):
        """(state, step): the checkpoint to resume from, else (`like`, 0) when there is none.

        `step` (default: the constructor's `restore_step`) resumes from that step; checkpoints
        newer than it are set aside so later saves and resumes do not pick them up. Step 0 sets
        every checkpoint aside and starts afresh.
        """
        step = self.restore_step if step is None else step
        if step is None:
            if self.latest_step() is None:
                return like, 0
            return self._restore_latest_intact(like)
        steps = self._manager.all_steps()
        if step == 0:  # Start afresh, keeping the old checkpoints aside.
            for newer in sorted(steps):
                self._set_aside(newer, "is set aside by restore step 0 (a fresh start)")
            return like, 0
        if step not in steps:
            raise CheckpointRestoreError(
                f"--restore_step={step}: no checkpoint of step {step} in {self.directory}; "
                f"kept steps: {sorted(steps) or 'none'}")
        state = self._restore_checked(like, step)
        for newer in sorted(s for s in steps if s > step):
            self._set_aside(newer, f"is newer than the chosen restore step {step}")
        return state, step

    def describe_last_good(self) -> str:
        """A sentence naming the newest finite checkpoint (path, step, magnitude) or saying
        plainly that none exists yet, for the drivers' error messages."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            largest = self._largest_abs(step)
            if largest is None:
                continue
            earlier = steps[i + 1:]
            text = (f"the last good checkpoint (step {step}) is kept in "
                    f"{self.directory / str(step)} (all values finite, largest |value| "
                    f"{largest:.2g}); a rerun resumes from it")
            if earlier:
                text += (f"; if it has diverged too, earlier kept steps {sorted(earlier)} are "
                         f"chosen with {_FLAG_HINT}")
            return text
        if steps:
            return (f"none of the checkpoints in {self.directory} (steps {sorted(steps)}) reads "
                    f"back finite; a rerun in a fresh --workdir starts from step 0")
        return f"no checkpoint has been written yet in {self.directory}; a rerun starts from step 0"

    def close(self) -> None:
        self._manager.close()

    # ---- internals

    def _restore_checked(self, like, step: int):
        abstract = jax.tree.map(_abstract, like)
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not have the structure of "
                "this run's state (was the model, optimizer or experiment changed since it was "
                "written?); use a fresh --workdir or the original config") from e
        bad, largest = finite_check(state)
        if bad:
            raise NonFiniteStateError(
                f"the checkpoint at step {step} in {self.directory} holds non-finite values in "
                f"{_names(bad)}")
        self._largest[step] = largest
        return state

    def _restore_latest_intact(self, like):
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self._restore_checked(like, step)
            except ValueError as e:
                if "does not have the structure" in str(e):
                    raise  # The run changed, not the files: no older step will fit either.
                failures.append((step, _reason(e)))
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many error types.
                failures.append((step, _reason(e)))
            else:
                for bad_step, reason in failures:
                    self._set_aside(bad_step, f"does not read back ({reason}); resuming from "
                                              f"step {step}")
                return state, step
        tried = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} reads back intact ({tried}); to start from "
            f"step 0 with them set aside, rerun with --restore_step=0 (a flag of fer_jax.main; "
            f"env {RESTORE_STEP_ENV}=0), or use a fresh --workdir")

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves checkpoint `step` to checkpoints.set_aside/ (process 0; the others wait)."""
        if jax.process_index() == 0:
            self.set_aside_directory.mkdir(exist_ok=True)
            target = self.set_aside_directory / str(step)
            n = 0
            while target.exists():
                n += 1
                target = self.set_aside_directory / f"{step}.{n}"
            shutil.move(self.directory / str(step), target)
            (target / "SET_ASIDE_REASON.txt").write_text(reason + "\n")
            logging.warning("checkpoint %s %s; moved to %s", self.directory / str(step), reason,
                            target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"fer_jax_checkpoint_set_aside_{step}")
        self._manager.reload()
        self._largest.pop(step, None)

    def metadata(self, step: int) -> dict:
        """The metadata saved with checkpoint `step` ({} when there is none or it does not
        read)."""
        try:
            return dict(self._manager.metadata(step).custom_metadata or {})
        except Exception:  # noqa: BLE001 - a damaged metadata file reads as none.
            return {}

    def _largest_abs(self, step: int) -> float | None:
        """Largest |value| of checkpoint `step`, None when it is not finite or does not read."""
        if step in self._largest:
            return self._largest[step]
        try:
            # Written by this class: its save checked finiteness and recorded the magnitude.
            largest = self._manager.metadata(step).custom_metadata.get("largest_abs")
        except Exception:  # noqa: BLE001 - a damaged metadata file reads as unknown.
            largest = None
        if largest is None:  # Written elsewhere: read it back and check.
            try:
                bad, largest = finite_check(self._manager.restore(step))
            except Exception:  # noqa: BLE001
                return None
            if bad:
                return None
        self._largest[step] = largest
        return largest


def finite_check(tree) -> tuple[list[str], float]:
    """(paths of float leaves holding NaN/Inf, largest |value| over the finite leaves).

    One jitted max|x| per leaf (NaN and Inf propagate through it), a single host sync; NumPy
    for host leaves.
    """
    named = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
             for p, x in jax.tree_util.tree_leaves_with_path(tree)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    device = [(n, x) for n, x in named if isinstance(x, jax.Array)]
    host = [(n, np.asarray(x)) for n, x in named if not isinstance(x, jax.Array)]
    largest = []
    if device:
        # One jitted call per set of devices: a state may mix leaves committed to one device
        # with leaves replicated over the mesh (VFER's head next to its server state).
        groups = {}
        for i, (_, x) in enumerate(device):
            groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
        m = [None] * len(device)
        for idx in groups.values():
            for i, v in zip(idx, _max_abs([device[i][1] for i in idx]), strict=True):
                m[i] = v
        if not all(x.is_fully_addressable for x in m):
            from jax.experimental import multihost_utils

            m = multihost_utils.process_allgather(m, tiled=True)
        largest.extend(float(x) for x in jax.device_get(m))
    largest.extend(float(np.max(np.abs(x))) for _, x in host)
    names = [n for n, _ in device] + [n for n, _ in host]
    bad = [n for n, m in zip(names, largest, strict=True) if not np.isfinite(m)]
    return bad, float(max((m for m in largest if np.isfinite(m)), default=0.0))


@jax.jit
def _max_abs(leaves):
    return [jnp.max(jnp.abs(x)) for x in leaves]  # Each in its leaf's precision.


def _names(paths: list[str], limit: int = 4) -> str:
    more = f" and {len(paths) - limit} more leaves" if len(paths) > limit else ""
    return ", ".join(p or "<root>" for p in paths[:limit]) + more


def _reason(e: BaseException) -> str:
    """The first line of an exception, capped (TensorStore errors span many lines)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"


def _env_restore_step() -> int | None:
    value = os.environ.get(RESTORE_STEP_ENV, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{RESTORE_STEP_ENV}={value!r}: expected a checkpoint step (an integer)"
                         ) from None


def _abstract(x):
    if isinstance(x, jax.Array | np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return x
