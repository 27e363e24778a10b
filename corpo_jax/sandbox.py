"""Runs untrusted Python (a model's completion) and grades its function in a contained subprocess.

Grading does not trust the solution's interpreter. The child gets the code, the function's name
and each test's call arguments, never the expected values; it calls the function and reports
each return value as JSON (a value of another type, e.g. an object whose `__eq__` is always
True, is an error for that test). The parent parses the report itself and compares every value
with the expected one (`_same`: JSON equality, True != 1). Whatever the solution does to the
runner, it can only change what the report says: a report that is not exactly one JSON list of
one `{"value": ...}` or `{"error": "..."}` per test has status "malformed" and scores 0.

Layers that contain the code, outermost first:
  * a fresh temporary directory on the host holding the runner and the child's stdout (the
    report) and stderr files, each bounded by RLIMIT_FSIZE; removed afterwards;
  * when the trainer runs as root, the child drops to an unprivileged uid of its own (so
    RLIMIT_NPROC applies and root-owned files are out of reach);
  * namespaces, when `unshare` can create them here (`isolation()` says): user, mount, pid, net,
    ipc and uts. Before the solution runs, the runner (trusted code, with root's capabilities in
    its user namespace only) builds a new root and pivots into it: read-only binds of the
    interpreter's standard library and of the directories of its shared libraries,
    /etc/ld.so.cache, /dev/{null,zero,random,urandom}, a fresh /proc (only the sandbox's
    processes), and private tmpfs mounts for /tmp (the working directory) and /dev/shm of
    `Limits.disk_bytes` each. Nothing else of the host exists in it: not /etc, not the
    project (its directory is masked even if it lies under a bound one), not the problem files.
    The root is remounted read-only; then every capability is dropped. The net namespace has no
    interface but a down loopback; when the runner (pid 1 there) exits or is killed, the kernel
    kills every process it left;
  * seccomp (x86_64 and aarch64): no_new_privs and a filter that refuses execve, socket(),
    mount, namespace creation (unshare, setns, clone with CLONE_NEW*), setsid/setpgid (so no
    process leaves the group the parent kills), set*id, ptrace, bpf, keyctl, io_uring and the
    like. It also applies without namespaces;
  * rlimits set by the runner (soft = hard): RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC,
    RLIMIT_NOFILE, RLIMIT_CORE = 0; a wall-clock limit after which the process group is killed;
    `run_tests` returns only once every process of the group is gone;
  * an audit hook (sys.addaudithook) that refuses writes outside the working directory,
    sockets, starting programs, signals and ctypes with a readable message. Code can switch it
    off (e.g. by rewriting its `__code__`); nothing above relies on it.

No Python runs between fork and exec in the trainer (no preexec_fn), which matters in a JAX
process. Without namespaces (`isolation()["namespaces"] == "none"`) the code runs with the
host's filesystem as the sandbox uid, behind seccomp, the rlimits and the hook only; the code
task refuses that unless its config allows it (data/tasks/code.py).

One module (over 400 lines) because the layers above and the parent's grading are one security
boundary, read and reviewed together: a layer in another file would be easy to weaken without
seeing what the others assume of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

OUTPUT_TAIL = 2000  # characters of the child's stderr kept in a Result
_SECCOMP_ARCHES = ("x86_64", "aarch64")  # the runner's syscall tables
STATUSES = ("passed", "failed", "timeout", "killed", "malformed")


@dataclasses.dataclass(frozen=True)
class Limits:
  wall_s: float = 5.0  # wall-clock seconds before the process group is killed
  cpu_s: int = 3  # RLIMIT_CPU seconds
  memory_bytes: int = 512 << 20  # RLIMIT_AS: address space (Python itself needs ~40 MiB)
  file_bytes: int = 1 << 20  # RLIMIT_FSIZE: largest file (the report and stderr files included)
  processes: int = 8  # RLIMIT_NPROC: processes of the sandbox's uid (the runner included)
  disk_bytes: int = 16 << 20  # size of each private tmpfs (/tmp, /dev/shm) with namespaces

  def __post_init__(self):
    if (self.wall_s <= 0 or self.cpu_s < 1 or self.memory_bytes < (64 << 20)
        or self.processes < 2 or self.file_bytes < (64 << 10) or self.disk_bytes < (1 << 20)):
      raise ValueError(f"Bad sandbox limits {self}: need wall_s > 0, cpu_s >= 1, "
                       f"memory_bytes >= 64 MiB, processes >= 2, file_bytes >= 64 KiB, "
                       f"disk_bytes >= 1 MiB.")


@dataclasses.dataclass(frozen=True)
class Case:
  """One call of the solution's function: positional JSON arguments and the JSON value it must
  return."""

  args: tuple
  expected: Any


@dataclasses.dataclass(frozen=True)
class Result:
  """status: "passed" (every test returned its expected value), "failed" (some did not, the
  solution raised, or the runner exited without reporting), "timeout" (wall-clock limit),
  "killed" (a signal, e.g. SIGKILL at RLIMIT_CPU; with namespaces unshare 2.38 reports a
  killed runner as exit 1, so "failed") or "malformed" (the report is not the runner's format:
  the solution tampered with it). passed = 0 unless "passed" or "failed"."""

  status: str
  passed: int
  total: int
  output: str
  seconds: float

  def __post_init__(self):
    assert self.status in STATUSES and 0 <= self.passed <= self.total, self

  @property
  def fraction(self) -> float:
    return self.passed / self.total if self.total else 0.0


_RUNNER = r'''
import json, os, sys

ARCH = {"x86_64": 0, "aarch64": 1}.get(os.uname().machine)  # column of the syscall numbers
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
# statvfs flag -> the mount flag a bind remount must repeat (the kernel locks these)
KEEP = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
SYSCALLS = {  # name: (x86_64, aarch64)
  "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
  "unshare": (272, 97), "setns": (308, 268), "ptrace": (101, 117),
  "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kexec_load": (246, 104),
  "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
  "delete_module": (176, 106), "bpf": (321, 280), "perf_event_open": (298, 241),
  "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
  "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
  "io_uring_register": (427, 427), "execve": (59, 221), "execveat": (322, 281),
  "setsid": (112, 157), "setpgid": (109, 154), "setuid": (105, 146), "setgid": (106, 144),
  "setreuid": (113, 145), "setregid": (114, 143), "setresuid": (117, 147),
  "setresgid": (119, 149), "setgroups": (116, 159), "setfsuid": (122, 151),
  "setfsgid": (123, 152), "socket": (41, 198), "open_by_handle_at": (304, 265),
  "name_to_handle_at": (303, 264), "open_tree": (428, 428), "move_mount": (429, 429),
  "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
  "mount_setattr": (442, 442), "quotactl": (179, 60), "swapon": (167, 224),
  "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116), "acct": (163, 89),
  "settimeofday": (164, 170), "clock_settime": (227, 112), "adjtimex": (159, 171),
}
CLONE, CLONE3, AUDIT_ARCH = (56, 220), 435, (0xC000003E, 0xC00000B7)
CLONE_NEW = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME


def _libc():
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)

  def call(name, *args):  # integers as C longs: variadic and unsigned long parameters
    fn = getattr(libc, "syscall" if isinstance(name, int) else name)
    longs = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in (name, *args)]
    if fn(*(longs if isinstance(name, int) else longs[1:])) != 0:
      errno = ctypes.get_errno()
      raise OSError(errno, f"sandbox setup: {name}{args}: {os.strerror(errno)}")
  return ctypes, call


def _isolate(hide, disk_bytes):
  """Builds the new root (module docstring) on the working directory, pivots into it and drops
  every capability. Runs as root of a new user namespace, before any untrusted code."""
  ctypes, call = _libc()
  enc = lambda s: None if s is None else os.fsencode(s)
  mount = lambda src, dst, fs, flags, data=None: call(
      "mount", enc(src), enc(dst), enc(fs), flags, enc(data))
  new = os.getcwd()
  mount(None, "/", None, MS_REC | MS_PRIVATE)
  mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
  libs = {os.path.dirname(os.path.realpath(line.split(None, 5)[5].strip()))
          for line in open("/proc/self/maps") if ".so" in line and "/" in line}
  stdlib = os.path.dirname(os.path.realpath(os.__file__))
  for src in sorted(libs | {stdlib}) + ["/etc/ld.so.cache"]:
    if os.path.exists(src):
      _bind(mount, src, new + src, readonly=True)
  for dev in ("null", "zero", "random", "urandom"):
    _bind(mount, "/dev/" + dev, f"{new}/dev/{dev}", readonly=False)
  for path in hide:  # e.g. the project, should it lie under a bound directory
    if os.path.isdir(new + path):
      mount("tmpfs", new + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
  for path, fs, flags, data in (
      ("/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
      ("/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_bytes},nr_inodes=4096,mode=1777"),
      ("/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_bytes},nr_inodes=4096,mode=1777")):
    os.makedirs(new + path, exist_ok=True)
    mount(fs, new + path, fs, flags, data)
  os.chdir(new)
  call(SYSCALLS["pivot_root"][ARCH], b".", b".")  # the old root ends up on top; detach it
  call("umount2", b".", 2)  # MNT_DETACH
  mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/tmp")
  _drop_capabilities(ctypes, call)


def _bind(mount, src, dst, readonly):
  if os.path.isdir(src):
    os.makedirs(dst, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    open(dst, "a").close()
  mount(src, dst, None, MS_BIND | MS_REC)
  if not readonly:
    return
  points = [line.split()[4].replace("\\040", " ") for line in open("/proc/self/mountinfo")]
  for point in points:
    if point == dst or point.startswith(dst + "/"):
      kept = sum(v for k, v in KEEP.items() if os.statvfs(point).f_flag & k)
      mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _drop_capabilities(ctypes, call):
  last = int(open("/proc/sys/kernel/cap_last_cap").read())
  for cap in range(last + 1):
    call("prctl", 24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
  call("capset", header, (ctypes.c_uint32 * 6)())  # effective, permitted, inheritable: none


def _seccomp():
  """no_new_privs and a filter: the SYSCALLS table fails with EPERM, clone with a namespace
  flag too, clone3 with ENOSYS (so libc falls back to clone); another ABI kills the process."""
  ctypes, call = _libc()
  ERRNO, ALLOW = 0x00050000, 0x7FFF0000
  prog = [(0x20, 0, 0, 4), (0x15, 1, 0, AUDIT_ARCH[ARCH]),  # ld arch; jeq
          (0x06, 0, 0, 0x80000000), (0x20, 0, 0, 0)]  # ret KILL_PROCESS; ld nr
  denied = [numbers[ARCH] for numbers in SYSCALLS.values()]
  if ARCH == 0:
    prog.append((0x35, "eperm", 0, 0x40000000))  # jge: the x32 ABI
  prog += [(0x15, "eperm", 0, nr) for nr in denied]
  prog += [(0x15, "enosys", 0, CLONE3), (0x15, 0, "allow", CLONE[ARCH]), (0x20, 0, 0, 16),
           (0x45, "eperm", "allow", CLONE_NEW)]  # ld args[0]; jset
  labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2}
  prog += [(0x06, 0, 0, ALLOW), (0x06, 0, 0, ERRNO | 1), (0x06, 0, 0, ERRNO | 38)]

  class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]

  class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

  jump = lambda i, t: labels[t] - i - 1 if isinstance(t, str) else t
  rows = (Filter * len(prog))(*[Filter(c, jump(i, t), jump(i, f), k)
                                 for i, (c, t, f, k) in enumerate(prog)])
  call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
  call("prctl", 22, 2, ctypes.byref(Prog(len(prog), rows)), 0, 0)  # PR_SET_SECCOMP, FILTER


def _guard(root):
  realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
  path_events = {"os.remove": 1, "os.rename": 2, "os.mkdir": 1, "os.rmdir": 1, "os.chmod": 1,
                 "os.chown": 1, "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1,
                 "shutil.rmtree": 1, "shutil.copyfile": 2, "os.mkfifo": 1, "os.mknod": 1}
  denied = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "socket.", "os.setuid", "os.chroot", "pty.spawn", "ctypes.")

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
    elif event.startswith(denied):
      raise PermissionError(f"sandbox: {event} is not allowed")

  sys.addaudithook(hook)


def _plain(value):
  """Whether value is made of JSON types only (exact types, string keys)."""
  kind = type(value)
  if value is None or kind in (bool, int, float, str):
    return True
  if kind is list:
    return all(_plain(v) for v in value)
  return kind is dict and all(type(k) is str and _plain(v) for k, v in value.items())


def _call(fn, args, max_chars):
  """The report entry of one call: {"value": ...} or {"error": ...}, as JSON text."""
  try:
    value = fn(*json.loads(args))
    if not _plain(value):
      raise TypeError(f"returned a {type(value).__name__}, not a JSON value")
    text = json.dumps(value, allow_nan=False)
    if len(text) > max_chars:
      raise ValueError(f"the result has {len(text)} characters, more than {max_chars}")
    return '{"value": ' + text + '}'
  except BaseException as e:
    message = _describe(e)
    print(message, file=sys.stderr)
    return json.dumps({"error": message})


def _describe(e):
  try:
    return f"{type(e).__name__}: {e}"[:300]
  except BaseException:
    return "an exception that cannot be printed"


def _main():
  job = json.loads(sys.stdin.buffer.read())
  report = os.dup(1)
  os.dup2(2, 1)  # the solution's prints go to stderr; fd `report` carries only the report
  if job["namespaces"]:
    _isolate(job["hide"], job["disk_bytes"])
  import resource
  for name, value in job["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
  if job["seccomp"]:
    _seccomp()
  _guard(os.path.realpath(os.getcwd()))
  namespace = {"__name__": "__solution__"}
  try:
    exec(compile(job["code"], "solution.py", "exec"), namespace)
    fn = namespace.get(job["function"])
    if not callable(fn):
      raise NameError(f"the solution defines no function {job['function']!r}")
    entries = [_call(fn, args, job["max_chars"]) for args in job["calls"]]
  except BaseException as e:
    print(f"solution failed: {_describe(e)}", file=sys.stderr)
    entries = [json.dumps({"error": "the solution failed"})] * len(job["calls"])
  data = ("[" + ", ".join(entries) + "]").encode()
  while data:
    data = data[os.write(report, data):]
  os._exit(0)  # no atexit hooks or threads of the solution after the report


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


_UNSHARE = ("unshare", "--user", "--map-root-user", "--mount", "--pid", "--net", "--ipc",
            "--uts", "--fork", "--kill-child")
_PYTHON_FLAGS = ("-I", "-B", "-S")  # isolated (no env, no user site), no .pyc writes, no site
# Masked inside the sandbox should a bound directory hold it: the project (or the installed
# package), whose files include the problems and their solutions.
_HIDDEN = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),)
_PROBE = ("def f(x):\n    return [x + 1, sorted({'b': 1, 'a': 2})]\n",
          "f", [Case((1,), [2, ["a", "b"]])])


@dataclasses.dataclass(frozen=True)
class _Launcher:
  command: tuple[str, ...]  # the prefix that starts the runner: [unshare ...] python flags
  seccomp: bool
  failures: tuple[str, ...]  # the candidates tried before it, with why they failed

  @property
  def namespaces(self) -> bool:
    return self.command[0] == "unshare"


@functools.cache
def _launcher() -> _Launcher:
  """The first of (namespaces or not) x (this interpreter, /usr/bin/python3) that passes a
  probe. The sandbox uid may be unable to run this interpreter (e.g. a pyenv under /root); the
  runner needs only the standard library."""
  pythons = [sys.executable] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
  seccomp = os.uname().machine in _SECCOMP_ARCHES
  prefixes = [_UNSHARE, ()] if shutil.which("unshare") and seccomp else [()]
  tried = []
  for prefix in prefixes:
    for python in pythons:
      launcher = _Launcher((*prefix, python, *_PYTHON_FLAGS), seccomp, tuple(tried))
      try:
        result = _run(launcher, *_PROBE, Limits())
      except OSError as e:  # e.g. this uid may not execute the interpreter
        tried.append(f"{' '.join(launcher.command)}: {e}")
        continue
      if result.status == "passed":
        return launcher
      tried.append(f"{' '.join(launcher.command)}: {result.status} "
                   f"{result.output.strip()[-300:]!r}")
  raise ValueError("The code sandbox cannot run Python on this machine; tried:\n  " +
                   "\n  ".join(tried))


def isolation() -> dict[str, str]:
  """Which layers this machine gives (module docstring), for logs, docs and the code task."""
  launcher, uid = _launcher(), _sandbox_uid()
  ns = launcher.namespaces
  return {
      "namespaces": "user+mount+pid+net+ipc+uts (unshare)" if ns else "none",
      "filesystem": ("read-only root of the interpreter's files; private /tmp and /dev/shm; "
                     "fresh /proc") if ns else "the host's, as the sandbox uid (audit hook only)",
      "network": "no interfaces (net namespace) + seccomp" if ns
                 else "seccomp" if launcher.seccomp else "audit hook only",
      "seccomp": f"on ({os.uname().machine})" if launcher.seccomp
                 else f"unavailable ({os.uname().machine}: no syscall table)",
      "uid": f"dropped to {uid}" if uid is not None else "the trainer's own",
      "python": launcher.command[-len(_PYTHON_FLAGS) - 1],
      "why_no_namespaces": "" if ns else "; ".join(launcher.failures) or "unshare not found",
  }


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


def _tail(path: str, chars: int) -> str:
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - chars))
    return f.read().decode("utf-8", "replace")


def run_tests(code: str, function: str, tests: Sequence[Case],
              limits: Limits = Limits()) -> Result:
  """Runs `code`, calls `function` with each test's arguments in the sandbox and counts the
  calls that return the expected value; never raises on anything `code` does (ValueError if
  this machine cannot run the sandbox at all, see `_launcher`)."""
  return _run(_launcher(), code, function, tests, limits)


def _run(launcher: _Launcher, code: str, function: str, tests: Sequence[Case], limits: Limits,
         seccomp: bool = True) -> Result:
  """run_tests with a given launcher; seccomp=False (tests only) leaves the filter out to show
  what the other layers stop alone."""
  uid = _sandbox_uid()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="corpo_sandbox_", ignore_cleanup_errors=True) as root:
    runner = os.path.join(root, "_runner.py")
    with open(runner, "w") as f:
      f.write(_RUNNER)
    if uid is not None:
      os.chown(root, uid, uid)
    report_path, stderr_path = os.path.join(root, "_report"), os.path.join(root, "_stderr")
    job = json.dumps({
        "code": code, "function": function, "calls": [json.dumps(list(t.args)) for t in tests],
        "max_chars": limits.file_bytes // (2 * max(1, len(tests))), "rlimits": _rlimits(limits),
        "namespaces": launcher.namespaces, "seccomp": launcher.seccomp and seccomp,
        "hide": list(_HIDDEN), "disk_bytes": limits.disk_bytes}).encode()
    with open(report_path, "wb") as out, open(stderr_path, "wb") as err:
      proc = subprocess.Popen([*launcher.command, runner], cwd=root, stdin=subprocess.PIPE,
                              stdout=out, stderr=err,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              user=uid, group=uid, extra_groups=None if uid is None else [],
                              start_new_session=True)
      try:
        proc.communicate(job, timeout=limits.wall_s)
        timed_out = False
      except subprocess.TimeoutExpired:
        timed_out = True
      _kill_group(proc)  # also any process the solution left behind
    report, output = _tail(report_path, limits.file_bytes), _tail(stderr_path, OUTPUT_TAIL)
  values = _parse(report, len(tests))
  if timed_out:
    status, passed = "timeout", 0
  elif values is None:
    status, passed = "malformed", 0
    output = (output + f"\nsandbox: malformed report {report[:200]!r}")[-OUTPUT_TAIL:]
  elif not report:
    status, passed = ("killed" if proc.returncode < 0 else "failed"), 0
  else:
    passed = sum(v is not _ERROR and _same(v, t.expected) for v, t in zip(values, tests))
    status = "passed" if passed == len(tests) else "failed"
  return Result(status, passed, len(tests), output, time.perf_counter() - start)


_ERROR = object()  # a test whose call raised or returned something that is not JSON


def _reject(constant: str):
  raise ValueError(f"{constant} is not JSON")


def _parse(report: str, n: int) -> list | None:
  """The n values of the child's report ([] for an empty report), or None if it is not a JSON
  list of n {"value": v} / {"error": str} objects."""
  if not report:
    return []
  try:
    entries = json.loads(report, parse_constant=_reject)
  except (ValueError, RecursionError):
    return None
  if type(entries) is not list or len(entries) != n:
    return None
  values = []
  for entry in entries:
    if type(entry) is dict and entry.keys() == {"value"}:
      values.append(entry["value"])
    elif type(entry) is dict and entry.keys() == {"error"} and type(entry["error"]) is str:
      values.append(_ERROR)
    else:
      return None
  return values


def _same(got: Any, want: Any) -> bool:
  """JSON equality without Python's coercions between types: True != 1, [1] != {"0": 1};
  numbers compare by value (3 == 3.0) as `==` does."""
  if isinstance(want, bool) or isinstance(got, bool):
    return type(got) is type(want) and got == want
  if isinstance(want, (int, float)):
    return type(got) in (int, float) and got == want
  if isinstance(want, list):
    return (type(got) is list and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want)))
  if isinstance(want, dict):
    return (type(got) is dict and got.keys() == want.keys()
            and all(_same(got[k], want[k]) for k in want))
  return type(got) is type(want) and got == want
