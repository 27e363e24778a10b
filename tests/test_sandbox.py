"""The code sandbox grades hostile code as a failure, contains what it does and keeps working.

Each attack of docs/reliability.md section 1 has a test here. Escapes are tried with the audit
hook switched off first (HOOK_OFF), so what stops them is the layers below it; where a test
passes seccomp=False it shows what the namespaces stop without the filter.
"""

import os
import socket
import subprocess
import tempfile

import pytest

from corpo_jax import sandbox
from corpo_jax.sandbox import Case

TESTS = [Case((1, 2), 3), Case((2, 2), 4), Case((-1, 1), 0)]
ADD = "def add(a, b):\n    return a + b\n"
FAST = sandbox.Limits(wall_s=3.0, cpu_s=1, memory_bytes=256 << 20, processes=8)
NAMESPACES = sandbox._launcher().namespaces
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="no unprivileged namespaces here")

# Makes every audit hook of the runner a no-op (same number of free variables, so __code__ can
# be replaced), then loads a library with ctypes, which the hook refuses while it is on.
HOOK_OFF = '''
import gc
def _noop_code(fn):
    names = fn.__code__.co_freevars
    src = ("def outer():\\n" + "".join(f"    {n} = None\\n" for n in names) +
           "    def hook(event, args):\\n" + "".join(f"        {n}\\n" for n in names) +
           "        return None\\n    return hook\\n")
    scope = {}
    exec(src, scope)
    return scope["outer"]().__code__
for _fn in gc.get_objects():
    if type(_fn).__name__ == "function" and _fn.__name__ == "hook":
        _fn.__code__ = _noop_code(_fn)
import ctypes
ctypes.CDLL(None)
'''
# f(*calls) -> the errno name of each call that raised, "ok" for the others.
OUTCOMES = '''
import errno, os, socket
def _outcome(call):
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
'''


def run(code, tests=TESTS, limits=FAST, function="add", **kwargs):
  return sandbox._run(sandbox._launcher(), code, function, tests, limits, **kwargs)


def _no_namespaces():
  """The launcher in use without the namespaces (the fallback where unshare cannot work)."""
  launcher = sandbox._launcher()
  if not launcher.namespaces:
    return launcher
  return sandbox._Launcher(launcher.command[len(sandbox._UNSHARE):], launcher.seccomp, ())


LAUNCHERS = {"in_use": sandbox._launcher(), **({"no_namespaces": _no_namespaces()}
                                               if NAMESPACES else {})}


def _leftover_processes():
  """Live processes of the sandbox: its own uid when the trainer runs as root, else any
  process running a sandbox runner."""
  uid, out = sandbox._sandbox_uid(), []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if uid is not None:
        if os.stat(f"/proc/{pid}").st_uid == uid:
          out.append(int(pid))
      elif b"corpo_sandbox_" in open(f"/proc/{pid}/cmdline", "rb").read():
        out.append(int(pid))
    except (FileNotFoundError, ProcessLookupError):
      pass
  return out


def _assert_still_scores_correct_code(launcher=None):
  result = sandbox._run(launcher or sandbox._launcher(), ADD, "add", TESTS, FAST)
  assert (result.status, result.passed, result.fraction) == ("passed", 3, 1.0), result.output


# ----------------------------------------------------------------------------- grading


def test_correct_partial_and_broken_solutions():
  _assert_still_scores_correct_code()
  partial = run("def add(a, b):\n    return 3\n")
  assert (partial.status, partial.passed, partial.total) == ("failed", 1, 3)
  syntax = run("def add(a, b)\n    return a + b\n")
  assert (syntax.status, syntax.passed) == ("failed", 0)
  assert "SyntaxError" in syntax.output
  missing = run("def plus(a, b):\n    return a + b\n")
  assert (missing.status, missing.passed) == ("failed", 0)
  assert "defines no function 'add'" in missing.output


def test_results_compare_as_json_values():
  assert sandbox._same(3.0, 3) and sandbox._same([1, {"a": None}], [1, {"a": None}])
  for got, want in [(True, 1), (1, True), (0, False), ([1], [1, 2]), ({"a": 1}, {"a": 1, "b": 2}),
                    ("1", 1), (None, 0), ([True], [1])]:
    assert not sandbox._same(got, want), (got, want)
  # A tuple or set is not a JSON value: the call is an error (as `(1, 2) == [1, 2]` is False).
  for value in ("(1, 2)", "{1, 2}", "{1: 2}", "float('nan')", "float('inf')"):
    result = run(f"def f():\n    return {value}\n", [Case((), [1, 2])], function="f")
    assert (result.status, result.passed) == ("failed", 0), value


def test_arguments_are_fresh_json_for_every_call():
  code = "def f(xs):\n    xs.append(1)\n    return len(xs)\n"
  result = run(code, [Case(([],), 1), Case(([],), 1)], function="f")
  assert (result.status, result.passed) == ("passed", 2)


def test_exiting_early_is_not_a_pass():
  for code in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", ADD + "raise SystemExit\n",
               "import sys\ndef add(a, b):\n    sys.exit(0)\n"):
    result = run(code)
    assert (result.status, result.passed) == ("failed", 0), code


def test_replacing_exec_and_compile_does_not_pass_wrong_code():
  code = ("import builtins\nbuiltins.exec = lambda *a, **k: None\n"
          "builtins.compile = lambda *a, **k: None\ndef add(a, b):\n    return -1\n")
  result = run(code)
  assert (result.status, result.passed) == ("failed", 0), result.output
  _assert_still_scores_correct_code()


def test_an_always_equal_result_does_not_pass():
  code = ("class Anything:\n    def __eq__(self, other):\n        return True\n"
          "    __hash__ = object.__hash__\n"
          "class Int(int):\n    def __eq__(self, other):\n        return True\n"
          "def add(a, b):\n    return Anything() if a > 0 else Int(7)\n")
  result = run(code)
  assert (result.status, result.passed) == ("failed", 0)
  assert "returned a Anything, not a JSON value" in result.output
  assert "returned a Int, not a JSON value" in result.output


def test_the_runners_frames_and_objects_hold_no_expected_value():
  # f returns what it finds of the secret anywhere in the interpreter: frames (the runner's
  # locals and globals, e.g. the job) and every object the garbage collector tracks.
  code = '''
import gc, sys
def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in list(obj.items()):
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
def f():
    key = "-".join(["secret", "7f3a"])  # not in the source, which the job holds
    found = []
    frame = sys._getframe()
    while frame:
        for scope in (frame.f_locals, frame.f_globals):
            found += [s for s in _strings(dict(scope)) if key in s and s is not key]
        frame = frame.f_back
    for obj in gc.get_objects():
        found += [s for s in _strings(obj) if key in s and s is not key]
    return found[0] if found else "not found"
'''
  assert run(code, [Case((), "secret-7f3a")], function="f").passed == 0
  found = run(code, [Case((), "not found")], function="f")
  assert (found.status, found.passed) == ("passed", 1), found.output  # it looked, found nothing


@pytest.mark.parametrize("forged", [
    '{"passed": 999}',  # the old protocol's count
    '[' + ', '.join(['{"value": 3}'] * 999) + ']',  # more entries than tests
    '[{"value": 3}, {"value": 4}, {"value": NaN}]',  # a non-number where a number goes
    '[{"value": 3}, {"value": 4}, {"value": 0, "passed": true}]',  # extra keys
    '[{"value": 3}, {"value": 4}, {"error": 0}]',
    '"999"', '999', '[' * 100000 + ']' * 100000, '\udcff',  # deeper than json can parse
])
def test_a_forged_report_is_malformed_and_scores_0(forged):
  # The solution replaces os.write, which the runner uses for its report.
  code = (f"import os, posix\n_forged = {forged!r}.encode('utf-8', 'surrogateescape')\n"
          "os.write = lambda fd, data: (posix.write(fd, _forged), len(data))[1]\n"
          "def add(a, b):\n    return 0\n")
  result = run(code)
  assert (result.status, result.passed) == ("malformed", 0), result.output
  assert "malformed report" in result.output
  _assert_still_scores_correct_code()


def test_a_well_formed_forged_report_is_graded_on_its_values():
  code = ("import os, posix\n"
          "os.write = lambda fd, data: posix.write(fd, b'[{\"value\": 0}, {\"value\": 0}, "
          "{\"value\": 0}]') or len(data)\ndef add(a, b):\n    return a + b\n")
  result = run(code)
  assert (result.status, result.passed) == ("failed", 1)  # only add(-1, 1) == 0 matches


# ----------------------------------------------------------------------------- containment


@pytest.mark.parametrize("code,status", [
    ("while True:\n    pass\n", ("killed", "failed", "timeout")),  # RLIMIT_CPU (SIGXCPU)
    ("import time\ntime.sleep(60)\n", ("timeout",)),  # wall-clock limit, no CPU used
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n",
     ("passed",)),  # a thread left running does not hold the result back (os._exit)
])
def test_infinite_loops_are_stopped(code, status):
  limits = sandbox.Limits(wall_s=1.5, cpu_s=1)
  result = run(code + ADD, limits=limits)
  assert result.status in status and result.passed == (3 if status == ("passed",) else 0)
  assert result.seconds < limits.wall_s + 5  # + the wait for the killed group (loaded machine)
  assert _leftover_processes() == []
  _assert_still_scores_correct_code()


def test_fork_loop_is_bounded_by_rlimit_nproc_and_cleaned_up():
  code = ("import os, time\nfor _ in range(10000):\n    if os.fork() == 0:\n"
          "        time.sleep(60)\n        os._exit(0)\n") + ADD
  result = run(code)
  assert (result.status, result.passed) == ("failed", 0)
  assert "Resource temporarily unavailable" in result.output  # fork() hit RLIMIT_NPROC
  assert _leftover_processes() == []  # every child was killed with the sandbox
  _assert_still_scores_correct_code()


@pytest.mark.parametrize("name", LAUNCHERS)
def test_background_processes_do_not_survive(name):
  # Children try to leave the process group (setsid, setpgid), double-fork and sleep.
  code = HOOK_OFF + OUTCOMES + '''
import time
def f():
    got = []
    for leave in (os.setsid, lambda: os.setpgid(0, 0)):
        pid = os.fork()
        if pid == 0:
            outcome = _outcome(leave)
            if os.fork() == 0:
                time.sleep(60)
            os._exit(["ok", "EPERM"].index(outcome) if outcome in ("ok", "EPERM") else 2)
        got.append(["ok", "EPERM", "other"][os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])])
    return got
'''
  launcher = LAUNCHERS[name]
  result = sandbox._run(launcher, code, "f", [Case((), ["EPERM", "EPERM"])], FAST)
  assert (result.status, result.passed) == ("passed", 1), result.output  # seccomp refused both
  assert _leftover_processes() == []
  if name == "in_use" and NAMESPACES:  # without seccomp the pid namespace still kills them
    result = run(code, [Case((), ["ok", "ok"])], function="f", seccomp=False)
    assert (result.status, result.passed) == ("passed", 1), result.output
    assert _leftover_processes() == []


def test_starting_programs_is_refused():
  code = "import subprocess\nfor _ in range(100):\n    subprocess.Popen(['sleep', '60'])\n" + ADD
  result = run(code)
  assert (result.status, result.passed) == ("failed", 0)
  assert "subprocess.Popen is not allowed" in result.output  # the audit hook's message


def test_fork_exec_and_multiprocessing_spawn_cannot_start_a_program():
  # _posixsubprocess.fork_exec (what subprocess and multiprocessing's spawn use) raises no
  # audit event; seccomp refuses the execve in the child. The program tried is the dynamic
  # loader (the one executable the sandbox's root holds); spawn's child would create a file.
  code = HOOK_OFF + OUTCOMES + '''
import multiprocessing, subprocess, sys
def f():
    loader = next(l.split()[-1] for l in open("/proc/self/maps") if "/ld-" in l)
    spawn = multiprocessing.get_context("spawn").Process(target=open, args=("ran", "w"))
    spawn.start()  # spawn does not check that its child's exec worked
    spawn.join(2)
    popen = _outcome(lambda: subprocess.Popen([loader, "--version"]).wait())
    return [popen, spawn.exitcode, os.path.exists("ran")]
'''
  result = run(code, [Case((), ["EPERM", 255, False])], function="f")
  assert (result.status, result.passed) == ("passed", 1), result.output
  assert _leftover_processes() == []


def test_huge_allocation_fails_with_memory_error():
  result = run("x = bytearray(8 << 30)\n" + ADD)
  assert (result.status, result.passed) == ("failed", 0)
  assert "MemoryError" in result.output
  _assert_still_scores_correct_code()


@needs_namespaces
def test_writes_outside_the_temp_dir_are_contained():
  # A world-writable host directory (the audit hook is off): plain and dir_fd writes, creates,
  # truncates, deletes and mkdirs; then writes to the sandbox's own read-only root.
  victim_dir = tempfile.mkdtemp(prefix="corpo_sandbox_victim_", dir="/tmp")
  os.chmod(victim_dir, 0o777)
  victim = os.path.join(victim_dir, "victim")
  with open(victim, "w") as f:
    f.write("intact")
  os.chmod(victim, 0o666)
  code = HOOK_OFF + OUTCOMES + f'''
def f():
    d, v = {victim_dir!r}, {victim!r}
    at = lambda: os.open(d, os.O_RDONLY)
    return [_outcome(lambda: open(v, "w").write("pwned")),
            _outcome(lambda: os.truncate(v, 0)),
            _outcome(lambda: os.remove(v)),
            _outcome(lambda: os.open("victim", os.O_WRONLY | os.O_TRUNC, dir_fd=at())),
            _outcome(lambda: os.open("new", os.O_CREAT | os.O_WRONLY, dir_fd=at())),
            _outcome(lambda: os.unlink("victim", dir_fd=at())),
            _outcome(lambda: os.mkdir("sub", dir_fd=at())),
            _outcome(lambda: os.mkdir("/new")),
            _outcome(lambda: open(os.path.dirname(os.__file__) + "/new.py", "w")),
            _outcome(lambda: open("/tmp/scratch", "w").write("ok"))]
'''
  try:
    result = run(code, [Case((), ["ENOENT"] * 7 + ["EROFS", "EROFS", "ok"])], function="f")
    assert (result.status, result.passed) == ("passed", 1), result.output
    assert os.listdir(victim_dir) == ["victim"]
    with open(victim) as f:
      assert f.read() == "intact"
  finally:
    os.remove(victim)
    os.rmdir(victim_dir)


@needs_namespaces
def test_host_files_are_not_visible():
  project_file = os.path.abspath(sandbox.__file__)
  problems = os.path.join(os.path.dirname(project_file), "data/assets/code_problems.jsonl")
  assert os.path.exists(problems)
  code = HOOK_OFF + OUTCOMES + f'''
def f():
    reads = [_outcome(lambda p=p: open(p, "rb").read(1)) for p in
             ("/etc/passwd", "/etc/hostname", {project_file!r}, {problems!r},
              "/proc/{os.getpid()}/cmdline", "/proc/{os.getppid()}/cmdline")]
    pids = sorted(p for p in os.listdir("/proc") if p.isdigit())
    return [reads, pids, sorted(os.listdir("/etc")) if os.path.isdir("/etc") else []]
'''
  want = [["ENOENT"] * 6, ["1"], ["ld.so.cache"] if os.path.exists("/etc/ld.so.cache") else []]
  result = run(code, [Case((), want)], function="f")
  assert (result.status, result.passed) == ("passed", 1), result.output


@needs_namespaces
def test_the_project_is_masked_even_under_a_bound_directory(monkeypatch):
  python = sandbox._launcher().command[-len(sandbox._PYTHON_FLAGS) - 1]
  stdlib = subprocess.run([python, "-I", "-c", "import os; print(os.path.dirname(os.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
  code = f"import os\ndef f():\n    return len(os.listdir({stdlib + '/email'!r})) > 0\n"
  assert run(code, [Case((), True)], function="f").passed == 1  # visible: the stdlib is bound
  monkeypatch.setattr(sandbox, "_HIDDEN", (stdlib + "/email",))  # as if the project were there
  assert run(code, [Case((), False)], function="f").passed == 1


def test_setuid_is_refused():
  code = HOOK_OFF + OUTCOMES + '''
def f():
    return [_outcome(lambda: os.setuid(0)), _outcome(lambda: os.setuid(1)),
            _outcome(lambda: os.setgid(1)), _outcome(lambda: os.setgroups([]))]
'''
  result = run(code, [Case((), ["EPERM"] * 4)], function="f")
  assert (result.status, result.passed) == ("passed", 1), result.output


def test_namespaces_mounts_and_ptrace_are_refused():
  code = HOOK_OFF + OUTCOMES + '''
libc = ctypes.CDLL(None, use_errno=True)
def _check(rc):
    if rc != 0:
        raise OSError(ctypes.get_errno(), "")
def f():
    return [_outcome(lambda: _check(libc.unshare(0x10000000))),  # CLONE_NEWUSER
            _outcome(lambda: _check(libc.mount(b"none", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None))),
            _outcome(lambda: _check(libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None)))]
'''  # 16: PTRACE_ATTACH
  result = run(code, [Case((), ["EPERM"] * 3)], function="f")
  assert (result.status, result.passed) == ("passed", 1), result.output


@pytest.mark.parametrize("name", LAUNCHERS)
def test_loopback_tcp_is_refused(name):
  launcher = LAUNCHERS[name]
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = HOOK_OFF + OUTCOMES + f'''
def f():
    return _outcome(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
'''
    result = sandbox._run(launcher, code, "f", [Case((), "EPERM")], FAST)
    assert (result.status, result.passed) == ("passed", 1), result.output  # seccomp: socket()
    if name == "in_use" and NAMESPACES:  # without seccomp: the namespace's loopback is down
      result = run(code, [Case((), "ENETUNREACH")], function="f", seccomp=False)
      assert (result.status, result.passed) == ("passed", 1), result.output
    with pytest.raises(socket.timeout):
      listener.accept()  # nothing ever connected
  _assert_still_scores_correct_code(launcher)


def test_unix_sockets_of_the_host_are_unreachable_with_the_hook_off():
  sock_dir = tempfile.mkdtemp(prefix="corpo_sandbox_sock_", dir="/tmp")
  os.chmod(sock_dir, 0o777)
  path, abstract = os.path.join(sock_dir, "s"), f"\0corpo_sandbox_{os.getpid()}"
  with socket.socket(socket.AF_UNIX) as on_path, socket.socket(socket.AF_UNIX) as on_name:
    on_path.bind(path)
    on_name.bind(abstract)
    os.chmod(path, 0o777)
    for s in (on_path, on_name):
      s.listen()
      s.settimeout(0.2)
    code = HOOK_OFF + OUTCOMES + f'''
def f():
    def connect(address):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
    return [_outcome(lambda: connect({path!r})), _outcome(lambda: connect({abstract!r}))]
'''
    try:
      result = run(code, [Case((), ["EPERM", "EPERM"])], function="f")
      assert (result.status, result.passed) == ("passed", 1), result.output
      if NAMESPACES:  # without seccomp: no such path in the root; another net namespace
        result = run(code, [Case((), ["ENOENT", "ECONNREFUSED"])], function="f", seccomp=False)
        assert (result.status, result.passed) == ("passed", 1), result.output
      for s in (on_path, on_name):
        with pytest.raises(socket.timeout):
          s.accept()
    finally:
      os.remove(path)
      os.rmdir(sock_dir)


@needs_namespaces
def test_disk_use_is_bounded():
  code = HOOK_OFF + OUTCOMES + '''
def f(where):
    def fill():
        for i in range(1000):
            with open(f"{where}/{i}", "wb") as out:
                out.write(b"x" * (1 << 20))
    def files():
        for i in range(10000):
            open(f"{where}/empty{i}", "w").close()
    got = [_outcome(fill)]
    for name in os.listdir(where):
        os.remove(f"{where}/{name}")
    return got + [_outcome(files)]
'''
  tests = [Case((where,), ["ENOSPC", "ENOSPC"]) for where in ("/tmp", "/dev/shm")]
  result = run(code, tests, function="f", limits=sandbox.Limits(wall_s=10, disk_bytes=4 << 20))
  assert (result.status, result.passed) == ("passed", 2), result.output


def test_output_flood_is_bounded():
  result = run("while True:\n    print('x' * 100000)\n" + ADD)
  assert (result.status, result.passed) == ("failed", 0)
  assert len(result.output) <= sandbox.OUTPUT_TAIL


def test_isolation_reports_the_layers():
  layers = sandbox.isolation()
  assert set(layers) == {"namespaces", "filesystem", "network", "seccomp", "uid", "python",
                         "why_no_namespaces"}
  assert os.path.exists(layers["python"])
  assert (layers["why_no_namespaces"] == "") == NAMESPACES


def test_bad_limits_are_a_clear_error():
  with pytest.raises(ValueError, match="memory_bytes >= 64 MiB"):
    sandbox.Limits(memory_bytes=1 << 20)
