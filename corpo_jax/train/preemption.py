"""SIGTERM (preemption) while a stage runs: a checkpoint, then exit 0.

The contract: until a stage has a state to save, SIGTERM keeps its default action and ends
the process at once: main.py runs the stages inside `terminate_on_sigterm()` (entered after
jax.distributed.initialize). The loop calls `install_sigterm_handler()` once a stage has taken
its first step; from then on SIGTERM asks for a checkpoint, which `Checkpointer.preempted` reports at the end
of a step (one process: a flag; jax.distributed: JAX's preemption notifier, so that all
processes save at the same step). A later stretch that can sit in one long C call (initialising
or compiling the next stage) goes back inside `terminate_on_sigterm()`, which restores the
handler when it exits. Why: CPython runs a signal handler only between bytecodes of the main
thread, so while that thread is inside XLA compilation or a large allocation (minutes for a
large model) a flag handler never runs and the process would ignore SIGTERM until the scheduler
kills it; the default action is taken by the kernel, and nothing newer than the last complete
checkpoint is lost (an interrupted asynchronous save leaves only orbax's temporary directory,
never a partial checkpoint).

While the flag handler is installed (one process), a watchdog thread reads the signal wakeup fd,
which CPython's C-level handler writes even while the main thread is blocked (a hung collective
or device, a stuck write): SIGTERM sets the flag at once, and if the loop does not reach a step
boundary within SIGTERM_GRACE_S plus twice the last step's time (a step blocked for good, or an
evaluation), the process ends by SIGTERM's default action; a second SIGTERM ends it at once.
Once a boundary has seen the flag, the preemption save takes as long as it needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import select
import signal
import threading
import time
from typing import Any, Iterator

import jax

_SIGTERM = threading.Event()


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

SIGTERM_GRACE_S = 60.0  # the watchdog's wait for a step boundary, beyond twice the last step
_BOUNDARIES: list[float] = []  # monotonic times of the last two step boundaries
_SAVING = threading.Event()  # a step boundary saw SIGTERM: the loop saves, no deadline
_WATCHDOG: list[threading.Thread] = []


def _terminate() -> None:
  """Ends the process by SIGTERM's default action, from any thread (signal.signal is for the
  main thread only; libc's sigaction is not)."""
  if _SIGACTION is not None:
    _SIGACTION(signal.SIGTERM, ctypes.create_string_buffer(_SIGACTION_BYTES), None)  # SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
  os._exit(128 + signal.SIGTERM)


def _watch(wakeup: int) -> None:
  """The watchdog (module doc): every byte on `wakeup` is a signal the process received."""
  received, deadline = 0, None
  while True:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([wakeup], [], [], timeout)[0]:  # no step boundary in time
      if not _SAVING.is_set():
        _terminate()
      deadline = None
      continue
    for signum in os.read(wakeup, 64):
      if signum != signal.SIGTERM:
        continue
      received += 1
      _SIGTERM.set()
      if received > 1:
        _terminate()
      if deadline is None and not _SAVING.is_set():
        step_s = _BOUNDARIES[1] - _BOUNDARIES[0] if len(_BOUNDARIES) == 2 else 0.0
        deadline = time.monotonic() + SIGTERM_GRACE_S + 2 * step_s


def _start_watchdog() -> None:
  if _WATCHDOG:
    return
  read, write = os.pipe()
  os.set_blocking(write, False)
  previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
  if previous != -1:  # someone else's (an event loop's): keep theirs, run without a watchdog
    signal.set_wakeup_fd(previous)
    os.close(read)
    os.close(write)
    return
  _WATCHDOG.append(threading.Thread(target=_watch, args=(read,), daemon=True,
                                    name="corpo_jax SIGTERM watchdog"))
  _WATCHDOG[0].start()


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
  _start_watchdog()


def sigterm_received() -> bool:
  """True once SIGTERM arrived while `install_sigterm_handler`'s flag handler was installed.
  Called at every step boundary (`preempted`): the watchdog's clock; once True, the caller
  saves, and the watchdog waits for it."""
  _BOUNDARIES[:] = (_BOUNDARIES + [time.monotonic()])[-2:]
  if _SIGTERM.is_set():
    _SAVING.set()
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
