"""Runs untrusted Python (a model's completion) against unit tests in a contained subprocess.

Layers, outermost first:
  * a fresh temporary directory as the working directory, removed afterwards; stdout and stderr
    go to files in it (bounded by RLIMIT_FSIZE), so output floods cannot fill the trainer's memory;
  * rlimits the runner sets (soft = hard, so they cannot be raised) before the solution runs:
    RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC (processes),
    RLIMIT_NOFILE, RLIMIT_CORE = 0; a wall-clock limit after which the whole process group is
    killed. No Python runs between fork and exec (no preexec_fn), which matters in a JAX process;
  * when the trainer runs as root, the child drops to an unprivileged uid of its own (so
    RLIMIT_NPROC applies, which the kernel ignores for root, and root-owned files are read-only);
  * when `unshare` can create namespaces here (`isolation()` says), the child runs in new user,
    network and pid namespaces: no network interface but a down loopback, and every process it
    started dies with it;
  * an audit hook (sys.addaudithook, installed before the solution runs, cannot be removed)
    refuses writes outside the working directory, socket connections, starting programs
    (subprocess, exec, spawn, system), signalling other processes and ctypes. Without the
    network namespace this hook is what blocks the network.

The solution and then each test (an `assert` statement or any code) run with `exec` in one
namespace; a test passes if it runs without raising. Known limit: tests share the solution's
interpreter, so code that inspects the runner's frames could forge a pass; the layers above
contain harm to the machine, not reward hacking by introspection.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

OUTPUT_TAIL = 2000  # characters of the child's output kept in a Result


@dataclasses.dataclass(frozen=True)
class Limits:
  wall_s: float = 5.0  # wall-clock seconds before the process group is killed
  cpu_s: int = 3  # RLIMIT_CPU seconds
  memory_bytes: int = 512 << 20  # RLIMIT_AS: address space (Python itself needs ~40 MiB)
  file_bytes: int = 1 << 20  # RLIMIT_FSIZE: largest file (stdout/stderr files included)
  processes: int = 8  # RLIMIT_NPROC: processes of the sandbox's uid (the runner included)

  def __post_init__(self):
    if self.wall_s <= 0 or self.cpu_s < 1 or self.memory_bytes < (64 << 20) or self.processes < 2:
      raise ValueError(f"Bad sandbox limits {self}: need wall_s > 0, cpu_s >= 1, "
                       f"memory_bytes >= 64 MiB, processes >= 2.")


@dataclasses.dataclass(frozen=True)
class Result:
  """status: "passed" (every test ran without raising), "failed" (the solution or a test
  raised, or the runner exited without reporting), "timeout" (wall-clock limit) or "killed"
  (a signal, e.g. SIGXCPU from RLIMIT_CPU or SIGKILL)."""

  status: str
  passed: int
  total: int
  output: str
  seconds: float

  @property
  def fraction(self) -> float:
    return self.passed / self.total if self.total else 0.0


_RUNNER = r'''
import json, os, sys

def _guard(root):
  realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
  path_events = {"os.remove": 1, "os.rename": 2, "os.mkdir": 1, "os.rmdir": 1, "os.chmod": 1,
                 "os.chown": 1, "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1,
                 "shutil.rmtree": 1, "shutil.copyfile": 2, "os.mkfifo": 1, "os.mknod": 1}
  denied = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.sendto",
            "socket.sendmsg", "os.setuid", "os.chroot", "pty.spawn")

  def inside(path):
    if isinstance(path, int):
      return True
    try:
      path = realpath(fsdecode(path))
    except Exception:
      return False
    return path == root or path.startswith(root + sep) or path == "/dev/null"

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & write_flags)
      if writing and not inside(path):
        raise PermissionError(f"sandbox: writing {path!r} is not allowed")
    elif event in path_events:
      for path in args[:path_events[event]]:
        if not inside(path):
          raise PermissionError(f"sandbox: {event} on {path!r} is not allowed")
    elif event in denied or event.startswith("ctypes."):
      raise PermissionError(f"sandbox: {event} is not allowed")

  sys.addaudithook(hook)


def _main():
  job = json.loads(sys.stdin.read())
  import resource
  for name, value in job["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
  out = os.dup(1)
  _guard(os.path.realpath(os.getcwd()))
  namespace = {"__name__": "__solution__"}
  passed = 0
  try:
    exec(compile(job["code"], "solution.py", "exec"), namespace)
    for i, test in enumerate(job["tests"]):
      try:
        exec(compile(test, f"test_{i}.py", "exec"), namespace)
        passed += 1
      except Exception as e:
        print(f"test {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
  except BaseException as e:
    print(f"solution failed: {type(e).__name__}: {e}", file=sys.stderr)
  os.write(out, f"\n{job['nonce']} {passed}\n".encode())

_main()
'''


@functools.cache
def _sandbox_uid() -> int | None:
  """An unprivileged uid of this trainer process when running as root (else None)."""
  return 200_000 + os.getpid() % 100_000 if os.geteuid() == 0 else None


def _rlimits(limits: Limits) -> dict[str, int]:
  """What the runner sets (soft = hard) before the solution runs."""
  return {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_bytes,
          "RLIMIT_FSIZE": limits.file_bytes, "RLIMIT_NPROC": limits.processes,
          "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}


_UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
_PYTHON_FLAGS = ("-I", "-B", "-S")  # isolated (no env, no user site), no .pyc writes, no site


@functools.cache
def _launcher() -> tuple[str, ...]:
  """The command prefix that runs the runner: the first of (namespaces or not) x (this
  interpreter, /usr/bin/python3) that passes a probe. The sandbox uid may be unable to run this
  interpreter (e.g. a pyenv under /root); the runner needs only the standard library."""
  pythons = [sys.executable] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
  prefixes = [_UNSHARE, ()] if shutil.which("unshare") else [()]
  tried = []
  for prefix in prefixes:
    for python in pythons:
      command = (*prefix, python, *_PYTHON_FLAGS)
      result = _run(command, "x = 1", ["assert x == 1"], Limits())
      if result.status == "passed":
        return command
      tried.append(f"{' '.join(command)}: {result.status} {result.output.strip()[-200:]!r}")
  raise ValueError("The code sandbox cannot run Python on this machine; tried:\n  " +
                   "\n  ".join(tried))


def isolation() -> dict[str, str]:
  """Which layers this machine gives (module docstring), for logs and docs."""
  command, uid = _launcher(), _sandbox_uid()
  namespaces = command[0] == "unshare"
  return {"namespaces": "user+net+pid (unshare)" if namespaces else "none",
          "network": "no interfaces (net namespace) + audit hook" if namespaces
                     else "audit hook only",
          "uid": f"dropped to {uid}" if uid is not None else "the trainer's own",
          "python": command[-len(_PYTHON_FLAGS) - 1]}


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
  """SIGKILLs the child's process group and waits (up to grace_s) until all of it is gone."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline:
    try:
      os.killpg(proc.pid, 0)  # succeeds while any member still exists
    except ProcessLookupError:
      return
    time.sleep(0.01)


def _tail(path: str) -> str:
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - OUTPUT_TAIL))
    return f.read().decode("utf-8", "replace")


def run_tests(code: str, tests: Sequence[str], limits: Limits = Limits()) -> Result:
  """Runs `code` then each of `tests` in the sandbox; never raises on anything `code` does
  (ValueError if this machine cannot run the sandbox at all, see `_launcher`)."""
  return _run(_launcher(), code, tests, limits)


def _run(launcher: Sequence[str], code: str, tests: Sequence[str], limits: Limits) -> Result:
  nonce = secrets.token_hex(16)
  uid = _sandbox_uid()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="corpo_sandbox_", ignore_cleanup_errors=True) as root:
    runner = os.path.join(root, "_runner.py")
    with open(runner, "w") as f:
      f.write(_RUNNER)
    if uid is not None:
      os.chown(root, uid, uid)
    stdout_path, stderr_path = os.path.join(root, "_stdout"), os.path.join(root, "_stderr")
    command = [*launcher, runner]
    job = json.dumps({"code": code, "tests": list(tests), "nonce": nonce,
                      "rlimits": _rlimits(limits)}).encode()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
      proc = subprocess.Popen(command, cwd=root, stdin=subprocess.PIPE, stdout=out, stderr=err,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              user=uid, group=uid, extra_groups=None if uid is None else [],
                              start_new_session=True)
      try:
        proc.communicate(job, timeout=limits.wall_s)
        status = None
      except subprocess.TimeoutExpired:
        status = "timeout"
      _kill_group(proc)  # also any process the solution left behind
    stdout, output = _tail(stdout_path), _tail(stderr_path)
  passed = _reported(stdout, nonce)
  if status is None and passed is None:
    status = "killed" if proc.returncode < 0 else "failed"
  elif status is None:
    status = "passed" if passed == len(tests) else "failed"
  passed = passed if status in ("passed", "failed") and passed is not None else 0
  return Result(status, passed, len(tests), (stdout + output)[-OUTPUT_TAIL:],
                time.perf_counter() - start)


def _reported(stdout: str, nonce: str) -> int | None:
  """The runner's pass count, from its last line (None if it never reported)."""
  lines = stdout.rstrip("\n").rsplit("\n", 1)
  if not lines or not lines[-1].startswith(nonce + " "):
    return None
  return int(lines[-1].split()[1])
