"""The code sandbox contains hostile code, scores it as a failure and keeps working afterwards."""

import os
import socket
import tempfile

import pytest

from corpo_jax import sandbox

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
ADD = "def add(a, b):\n    return a + b\n"
FAST = sandbox.Limits(wall_s=3.0, cpu_s=1, memory_bytes=256 << 20, processes=8)


def _processes_of(uid):
  """Live pids owned by `uid` (the sandbox's own uid when the trainer runs as root)."""
  out = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if os.stat(f"/proc/{pid}").st_uid == uid:
        out.append(int(pid))
    except FileNotFoundError:
      pass
  return out


def _assert_still_scores_correct_code():
  result = sandbox.run_tests(ADD, TESTS, FAST)
  assert (result.status, result.passed, result.fraction) == ("passed", 3, 1.0), result.output


def test_correct_partial_and_broken_solutions():
  _assert_still_scores_correct_code()
  partial = sandbox.run_tests("def add(a, b):\n    return 3\n", TESTS, FAST)
  assert (partial.status, partial.passed, partial.total) == ("failed", 1, 3)
  syntax = sandbox.run_tests("def add(a, b)\n    return a + b\n", TESTS, FAST)
  assert (syntax.status, syntax.passed) == ("failed", 0)
  assert "SyntaxError" in syntax.output


def test_exiting_early_is_not_a_pass():
  for code in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", ADD + "raise SystemExit\n"):
    result = sandbox.run_tests(code, TESTS, FAST)
    assert (result.status, result.passed) == ("failed", 0), code


@pytest.mark.parametrize("code,status", [
    ("while True:\n    pass\n", ("killed", "failed", "timeout")),  # RLIMIT_CPU (SIGXCPU)
    ("import time\ntime.sleep(60)\n", ("timeout",)),  # wall-clock limit, no CPU used
])
def test_infinite_loops_are_stopped(code, status):
  limits = sandbox.Limits(wall_s=1.5, cpu_s=1)
  result = sandbox.run_tests(code + ADD, TESTS, limits)
  assert result.status in status and result.passed == 0
  assert result.seconds < limits.wall_s + 5  # + the wait for the killed group (loaded machine)
  _assert_still_scores_correct_code()


def test_fork_loop_is_bounded_by_rlimit_nproc_and_cleaned_up():
  code = ("import os, time\nfor _ in range(10000):\n    if os.fork() == 0:\n"
          "        time.sleep(60)\n        os._exit(0)\n") + ADD
  result = sandbox.run_tests(code, TESTS, FAST)
  assert (result.status, result.passed) == ("failed", 0)
  assert "Resource temporarily unavailable" in result.output  # fork() hit RLIMIT_NPROC
  uid = sandbox._sandbox_uid()
  if uid is not None:
    assert _processes_of(uid) == []  # every child was killed with the sandbox
  _assert_still_scores_correct_code()


def test_starting_programs_is_refused():
  code = "import subprocess\nfor _ in range(100):\n    subprocess.Popen(['sleep', '60'])\n" + ADD
  result = sandbox.run_tests(code, TESTS, FAST)
  assert (result.status, result.passed) == ("failed", 0)
  assert "subprocess.Popen is not allowed" in result.output


def test_huge_allocation_fails_with_memory_error():
  result = sandbox.run_tests("x = bytearray(8 << 30)\n" + ADD, TESTS, FAST)
  assert (result.status, result.passed) == ("failed", 0)
  assert "MemoryError" in result.output
  _assert_still_scores_correct_code()


@pytest.mark.parametrize("how", ["open", "os.open", "remove"])
def test_writes_outside_the_working_directory_are_refused(tmp_path, how):
  # /tmp is writable by every uid, so only the sandbox itself can stop this write.
  fd, target = tempfile.mkstemp(prefix="corpo_sandbox_victim_", dir="/tmp")
  os.close(fd)
  os.chmod(target, 0o666)
  code = {"open": f"open({target!r}, 'w').write('pwned')\n",
          "os.open": f"import os\nos.write(os.open({target!r}, os.O_WRONLY | os.O_TRUNC), b'pwned')\n",
          "remove": f"import os\nos.remove({target!r})\n"}[how]
  try:
    result = sandbox.run_tests(code + ADD, TESTS, FAST)
    assert (result.status, result.passed) == ("failed", 0)
    assert "is not allowed" in result.output
    with open(target) as f:
      assert f.read() == ""
  finally:
    os.remove(target)
  inside = sandbox.run_tests("open('scratch.txt', 'w').write('ok')\n" + ADD,
                             TESTS + ["assert open('scratch.txt').read() == 'ok'"], FAST)
  assert inside.status == "passed"  # the working directory itself is writable


def _launchers():
  """The launcher in use and, if it adds namespaces, the same interpreter without them (the
  fallback on machines without unprivileged namespaces: the audit hook alone)."""
  launcher = sandbox._launcher()
  return [launcher] + ([launcher[len(sandbox._UNSHARE):]] if launcher[0] == "unshare" else [])


@pytest.mark.parametrize("layers", range(len(_launchers())), ids=["in_use", "audit_hook_only"][
    :len(_launchers())])
def test_loopback_connection_is_refused(layers):
  launcher = _launchers()[layers]
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD
    result = sandbox._run(launcher, code, TESTS, FAST)
    assert (result.status, result.passed) == ("failed", 0)
    assert "socket.connect is not allowed" in result.output
    with pytest.raises(socket.timeout):
      listener.accept()  # nothing ever connected
    assert sandbox._run(launcher, ADD, TESTS, FAST).status == "passed"  # and it keeps working


def test_the_network_namespace_alone_has_no_route_to_the_host():
  if sandbox._launcher()[0] != "unshare":
    pytest.skip("no unprivileged namespaces here; the audit hook is the only network block")
  # Behind the audit hook: a fresh network namespace holds only its own loopback interface,
  # so code that got past the hook would still reach nothing outside the sandbox.
  code = "import socket\nnames = [n for _, n in socket.if_nameindex()]\n"
  result = sandbox.run_tests(code, ["assert names == ['lo'], names"], FAST)
  assert result.status == "passed", result.output


def test_output_flood_is_bounded():
  result = sandbox.run_tests("while True:\n    print('x' * 100000)\n" + ADD, TESTS, FAST)
  assert (result.status, result.passed) == ("failed", 0)
  assert len(result.output) <= sandbox.OUTPUT_TAIL


def test_isolation_reports_the_layers():
  layers = sandbox.isolation()
  assert set(layers) == {"namespaces", "network", "uid", "python"}
  assert os.path.exists(layers["python"])


def test_bad_limits_are_a_clear_error():
  with pytest.raises(ValueError, match="memory_bytes >= 64 MiB"):
    sandbox.Limits(memory_bytes=1 << 20)
