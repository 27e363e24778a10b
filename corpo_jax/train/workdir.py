"""One run per workdir: an exclusive lock on `<workdir>/run.lock`, held until the process exits.

Two runs writing one workdir corrupt each other (both save the same checkpoint steps, append
the same metrics rows, rewrite config.json), so the trainer takes the lock before it writes
anything, and a second run stops at once naming the holder, whose pid, host, start time and
command are in the file. The lock is `fcntl.flock`: the kernel drops it when the holder's
process ends however it ends (kill -9 included), so a stale file never blocks a rerun.

Multi-process runs: process 0 alone takes it (the processes of one run share the workdir), and
tells the others, which stop too. Across hosts the lock holds only where the filesystem's flock
reaches every host (local disks, NFS); on a Cloud Storage FUSE mount it is per host. A filesystem
without flock (ENOLCK, EOPNOTSUPP) runs unlocked, with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Callable

import jax

from corpo_jax import distributed

LOCK_FILE = "run.lock"
_HELD: dict[str, int] = {}  # realpath of a workdir -> the descriptor holding its lock


class WorkdirBusy(ValueError):
  """Another run holds the workdir's lock."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return (f"pid {h['pid']} on host {h['host']}, started {h['started']} "
            f"(command: {h['command']})")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its details yet"


def lock(workdir: str, say: Callable[[str], None]) -> None:
  """Takes the workdir's lock for the rest of the process's life (again: a no-op); raises
  WorkdirBusy naming the holder. Every process of a run calls it (process 0 takes the lock)."""
  busy = ""
  if jax.process_index() == 0:
    busy = _take(workdir, say)
  if distributed.max_over_processes(int(bool(busy))):
    raise WorkdirBusy(busy or f"Process 0 found --config.workdir={workdir!r} in use by another "
                      f"run (its error names it).")


def _take(workdir: str, say: Callable[[str], None]) -> str:
  """'' once this process holds the lock, else the message naming the holder."""
  key = os.path.realpath(workdir)
  if key in _HELD:
    return ""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"Cannot write to --config.workdir={workdir!r} ({e}); choose a writable "
                     f"directory with free space.") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      os.close(fd)
      return (f"--config.workdir={workdir!r} is in use by another run: {_holder(path)}. Wait for "
              f"it to finish or stop it, or choose another --config.workdir.")
    say(f"warning: the filesystem of {workdir} has no file locks ({e}); a second run on this "
        f"workdir will not be refused")
  _HELD[key] = fd
  record = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  except OSError as e:
    raise ValueError(f"Cannot write to --config.workdir={workdir!r} ({e}); choose a writable "
                     f"directory with free space.") from e
  return ""
