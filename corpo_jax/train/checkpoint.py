"""Orbax checkpoints of the train state, the data iterator and run metadata.

Layout: `<directory>/<step>/{state,data,meta}`. Saves are asynchronous (the host keeps
training while arrays are written) and atomic (orbax writes to a temporary directory and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest).
Restores take an abstract state whose leaves carry the target shardings, so a checkpoint written
on one mesh restores onto another.

Preemption: `Checkpointer.preempted(step)` is True after SIGTERM (installed by
`install_sigterm_handler`) or when JAX's multi-host preemption notice arrives; the loop then
saves and exits 0.

SIGTERM contract: until a stage has a state to save, SIGTERM keeps its default action and ends
the process at once: main.py runs the stages inside `terminate_on_sigterm()` (entered after
jax.distributed.initialize). The loop calls `install_sigterm_handler()` once a stage has taken
its first step; from then on SIGTERM asks for a checkpoint, which `preempted` reports at the end
of a step (one process: a flag; jax.distributed: JAX's preemption notifier, so that all
processes save at the same step). A later stretch that can sit in one long C call (initialising
or compiling the next stage) goes back inside `terminate_on_sigterm()`, which restores the
handler when it exits. Why: CPython runs a signal handler only between bytecodes of the main
thread, so while that thread is inside XLA compilation or a large allocation (minutes for a
large model) a flag handler never runs and the process would ignore SIGTERM until the scheduler
kills it; the default action is taken by the kernel, and nothing newer than the last complete
checkpoint is lost (an interrupted asynchronous save leaves only orbax's temporary directory,
never a partial checkpoint).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Iterator

import grain
import jax
import orbax.checkpoint as ocp

_SIGTERM = threading.Event()

# Orbax splits a replicated array into one slice per replica so that replicas (hosts) share its
# write. Below this many bytes per slice that costs more than it saves: each new slice shape is a
# compiled XLA program (the smoke run on 8 CPU devices compiled 144 of them, 4.4 s, to write
# kilobytes). Larger replicated arrays keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  absl_logger = logging.getLogger("absl")  # orbax warns about every override; this one is ours
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


# ----------------------------------------------------------------------------- SIGTERM


def _libc_sigaction() -> Any:
  try:
    return ctypes.CDLL(None, use_errno=True).sigaction
  except (OSError, AttributeError):  # no C library to ask (not POSIX): Python's view only
    return None


_SIGACTION = _libc_sigaction()
_SIGACTION_BYTES = 512  # more than sizeof(struct sigaction) on Linux and macOS; copied opaquely


@dataclasses.dataclass(frozen=True)
class _Action:
  """SIGTERM's disposition as Python's signal module and the OS each hold it: the OS's may be a
  handler installed from C++ (jax.distributed's preemption notifier) that Python cannot see."""

  python: Any
  os: Any  # a raw struct sigaction, None without libc


def _current() -> _Action:
  raw = None
  if _SIGACTION is not None:
    raw = ctypes.create_string_buffer(_SIGACTION_BYTES)
    raw = raw if _SIGACTION(signal.SIGTERM, None, raw) == 0 else None
  return _Action(signal.getsignal(signal.SIGTERM), raw)


def _restore(action: _Action) -> None:
  # None: set outside Python, which cannot reinstall it; the raw action below does.
  signal.signal(signal.SIGTERM, signal.SIG_DFL if action.python is None else action.python)
  if action.os is not None:
    _SIGACTION(signal.SIGTERM, action.os, None)


_SAVED: list[_Action] = []  # the actions that open terminate_on_sigterm blocks will restore


def install_sigterm_handler() -> None:
  """From now on SIGTERM asks for a checkpoint (main thread only; module doc). In a
  jax.distributed run that is JAX's preemption notifier, which jax.distributed.initialize
  installs and `Checkpointer.preempted` reads in step with the other processes: it is put back
  if an enclosing `terminate_on_sigterm` (entered after initialize) replaced it. Otherwise
  SIGTERM sets the flag that `preempted` reads."""
  if jax.distributed.is_initialized():
    if _SAVED:
      _restore(_SAVED[0])
    return
  signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())


def sigterm_received() -> bool:
  """True once SIGTERM arrived while `install_sigterm_handler`'s flag handler was installed."""
  return _SIGTERM.is_set()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
  """Inside the block SIGTERM ends the process at once (its default action): for stretches with
  no state to save that may sit in one long C call (module doc). On exit SIGTERM's previous
  action is back, a C++ handler included. A no-op off the main thread (only the main thread may
  set signal handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _SAVED.append(_current())
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    yield
  finally:
    _restore(_SAVED.pop())


class Checkpointer:
  """Saves and restores (state, data iterator, metadata) under one directory."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    directory = os.path.abspath(directory)
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise ValueError(f"Cannot create checkpoint directory {directory!r} ({e}); choose a "
                       f"writable --config.workdir.") from e
    if not os.access(directory, os.W_OK):
      raise ValueError(f"Checkpoint directory {directory!r} is not writable; choose a writable "
                       f"--config.workdir.")
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data_iterator: grain.DataLoaderIterator | Any | None = None, *,
           force: bool = True) -> bool:
    """Starts an asynchronous save of `state` (a pytree of jax arrays) at `step`."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:  # also raises a previous asynchronous save's error
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except OSError as e:
      raise self._write_error(e) from e

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state into `abstract_state`'s shapes, dtypes and shardings.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
    `jax.eval_shape` plus the shardings the run uses now). `data_iterator` is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"Checkpoint {self.directory}/{step} does not match this run's state "
                       f"(model or optimizer config changed?): {e}. Use a fresh "
                       f"--config.workdir or the original config.") from e
    return restored["state"], dict(restored["meta"])

  def restore_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def preempted(self, step: int) -> bool:
    """True once SIGTERM arrived or a multi-host preemption notice reached `step`."""
    return sigterm_received() or self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise self._write_error(e) from e

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def _write_error(self, e: OSError) -> ValueError:
    """A failed write (disk full, permissions): the complete checkpoints are untouched (orbax
    renames a checkpoint into place only once all of it is written)."""
    done = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    return ValueError(f"Writing a checkpoint under {self.directory} failed: {e}. The complete "
                      f"checkpoints (steps {done}) are intact; free disk space or fix the "
                      f"permissions, then rerun to resume from the latest.")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's current sharding (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
