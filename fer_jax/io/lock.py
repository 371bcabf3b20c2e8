"""One writer per workdir: a lock file naming its holder (host, PID, start time).

Two runs on one workdir interleave checkpoint writes (orbax's temporary folders collide) and
metrics lines. `fer_jax.main` takes this lock on process 0 before the experiment starts; a
second run fails at once with the holder named. The lock is created with O_EXCL (atomic on
local and NFS v3+ file systems) and removed at exit; a process killed with SIGKILL leaves it
behind, and the next run on the same host takes it over when that PID is gone (or now belongs
to a process started at another time). A lock from another host cannot be checked from here:
the message says which file to delete when that run is known to be over.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

from absl import logging

LOCK_NAME = "RUNNING.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds `workdir/RUNNING.lock` for the block."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir).absolute() / LOCK_NAME
        self.held = False

    def acquire(self) -> WorkdirLock:
        """Takes the lock (creating the workdir), or raises WorkdirLockedError / OSError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # A takeover that loses a race re-reads the new holder.
            if self._create():
                self.held = True
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # Released between our two calls: try again.
            if holder.get("unreadable") and not _is_stale(holder):
                time.sleep(0.2)  # Being written by its new holder right now.
                continue
            if not _is_stale(holder):
                raise WorkdirLockedError(self._held_message(holder))
            logging.warning("taking over the stale lock %s: %s is not running any more",
                            self.path, _describe(holder))
            self._take_over(holder)
        raise WorkdirLockedError(self._held_message(_read(self.path) or {}))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(_me(), f)
            f.write("\n")
        return True

    def _take_over(self, stale: dict) -> None:
        """Removes the stale lock, unless another process replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)  # Atomic: of racing takeovers, one moves a given file.
        except FileNotFoundError:
            return
        if _read(aside) != stale:  # We moved a live holder's fresh lock: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _held_message(self, holder: dict) -> str:
        here = holder.get("host") == socket.gethostname()
        how = (f"wait for it to finish, stop it (kill {holder.get('pid')}), or use another "
               f"--workdir" if here else
               f"wait for it, or delete {self.path} if that run is over, or use another --workdir")
        return f"workdir {self.path.parent} is in use by {_describe(holder)}: {how}"


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "pid_start_ticks": _start_ticks(pid)}


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')} "
            f"(started {holder.get('started')})")


def _read(path: pathlib.Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    if not isinstance(holder, dict):
        # A holder killed between creating and writing the file: stale if old enough.
        age = time.time() - path.stat().st_mtime if path.exists() else 0.0
        return {"host": socket.gethostname(), "pid": None, "unreadable": True, "age": age}
    return holder


def _is_stale(holder: dict) -> bool:
    """True when the holder is known to be gone: same host and its PID is not that process."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("unreadable"):
        return holder["age"] > 10.0
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # Alive, owned by another user.
    recorded = holder.get("pid_start_ticks")
    return recorded is not None and recorded != _start_ticks(pid)  # PID reused.


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
