"""The trainer as 2 processes x 4 fake CPU devices on localhost (jax.distributed, gloo).

One scenario, checked by two tests: a 1-process x 8-device reference run of a few RL steps
(checkpoint every 2) and, beside it, the same config as 2 processes; once the 2-process run has
checkpointed, process 1 is killed with SIGKILL. Process 0 must exit non-zero within a bounded
time (JAX's heartbeat timeout, --heartbeat_timeout_s) saying another task died; rerunning both
processes resumes from the last complete checkpoint and finishes. The finished 2-process run
must equal the reference: metrics row for row and the final parameters and optimizer state.

The kill must land mid-run. On a loaded machine the polling test process can be descheduled
until the run has written its last row, and a kill while the processes exit tests nothing (CI
once saw the survivor abort 0.27 s after the kill without the message), so such an attempt is
discarded and the 2-process run started again. The message is looked for in the survivor's
whole log: its SIGABRT appends faulthandler's stacks of ~17 threads after it (CI once failed a
check of the log's last 8,000 characters only).

Equality is to a tight tolerance, not bitwise: the sampled tokens, lengths and rewards come out
identical, but the gradient and metric reductions across the two processes go through gloo,
which sums in another order than XLA:CPU's in-process all-reduce (float32 last-bit differences,
measured ~1e-7 relative on metrics, < 1e-5 absolute on parameters).

Cost (measured): ~155 s of CPU for the five trainer processes, each compiling its own programs
(one 1-process run, two 2-process runs); 9-11 min wall on the 2-core machine at load 10-15.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from corpo_jax.train import setup as setup_lib
from corpo_jax.train import state as state_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
FLAGS = ["--config=configs/grpo.py:smoke", "--config.stages=('rl',)", f"--config.rl.steps={STEPS}",
         "--config.rl.checkpoint_every=2", "--config.rl.prompts_per_step=8",
         "--config.rl.group_size=2", "--config.rl.max_new_tokens=8", "--config.eval.tasks=()",
         "--config.model.thinking_layers=0"]
WALL_CLOCK_KEYS = ("time", "time/step_s", "time/rollout_s", "tokens_per_s")
HEARTBEAT_S = 10
EXIT_BOUND_S = 60  # heartbeat timeout plus slack for a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, num_processes: int, log_name: str) -> list[subprocess.Popen]:
  """Starts the run as `num_processes` processes sharing 8 fake CPU devices."""
  cmd = [sys.executable, "-m", "corpo_jax.main", *FLAGS, f"--config.workdir={workdir}"]
  flags = os.environ["XLA_FLAGS"].replace(  # tests/conftest.py's, with this run's device count
      "--xla_force_host_platform_device_count=8",
      f"--xla_force_host_platform_device_count={8 // num_processes}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=flags)
  if num_processes > 1:
    cmd += [f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={num_processes}",
            f"--heartbeat_timeout_s={HEARTBEAT_S}"]
  procs = []
  for i in range(num_processes):
    log = open(f"{workdir}.{log_name}.p{i}.log", "w")
    extra = [f"--process_id={i}"] if num_processes > 1 else []
    procs.append(subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
    procs[-1].log_path = log.name
  return procs


def _output(proc) -> str:
  with open(proc.log_path) as f:
    return f.read()


def _readable(log: str, limit: int = 8000) -> str:
  """The log's tail without faulthandler's stacks of idle worker threads (a SIGABRT prints one
  per thread, ~12 KB that would push JAX's own message out of an assertion's view)."""
  paragraphs = log.split("\n\n")
  threads = [i for i, p in enumerate(paragraphs) if p.lstrip().startswith("Thread 0x")]
  kept = [p for i, p in enumerate(paragraphs) if i not in threads[:-1]]  # the last is the main
  return "\n\n".join(kept)[-limit:]


def _wait(procs, timeout=600) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def _last_row(path) -> int:
  """The last step in a metrics file being appended to (0 before the first complete row)."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  complete = [line for line in lines if line.endswith("\n")]
  return max((json.loads(line)["step"] for line in complete), default=0)


def _wait_for_row(path, step, procs, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    for p in procs:
      assert p.poll() is None, f"run ended early:\n{_output(p)[-3000:]}"
    if _last_row(path) >= step:
      return
    time.sleep(0.1)
  raise AssertionError(f"no metrics row with step >= {step} in {timeout}s")


def _kill_mid_run(two, attempts: int = 3):
  """Starts the 2-process run, SIGKILLs process 1 once step 3's row is on disk (checkpoint 2
  written) and waits for process 0. Returns (process 0, its exit code, seconds to exit)."""
  metrics = str(two / "metrics.jsonl")
  for _ in range(attempts):
    shutil.rmtree(two, ignore_errors=True)
    killed = _start(two, 2, "killed")
    _wait_for_row(metrics, 3, killed)
    killed[1].kill()
    start = time.time()
    mid_run = _last_row(metrics) < STEPS
    survivor_rc = killed[0].wait(timeout=300)
    survivor_s = time.time() - start
    killed[1].wait()
    if mid_run:
      return killed[0], survivor_rc, survivor_s
  raise AssertionError(f"the run finished before the kill in {attempts} attempts")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  one, two = tmp / "one", tmp / "two"
  reference = _start(one, 1, "run")
  survivor, survivor_rc, survivor_s = _kill_mid_run(two)
  rerun = _start(two, 2, "rerun")
  for procs in (reference, rerun):
    assert _wait(procs) == [0] * len(procs), _output(procs[0])[-3000:]
  return {"one": one, "two": two, "survivor_rc": survivor_rc, "survivor_s": survivor_s,
          "survivor_out": _output(survivor), "rerun_out": [_output(p) for p in rerun]}


def _comparable(rows):
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]


def _final_state(workdir, scratch):
  """The last checkpoint's TrainState as numpy, restored onto this process's 8 devices."""
  with open(workdir / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.workdir = str(scratch)
  run = setup_lib.setup(config)
  _, optimizer = setup_lib.stage_optimizer(run, "rl")
  ckpt = Checkpointer(str(workdir / "checkpoints" / "rl"))
  target = state_lib.abstract_state(run.cfg, optimizer, run.mesh)
  state, meta = ckpt.restore(ckpt.latest_step(), target)
  ckpt.close()
  assert meta == {"stage": "rl", "step": STEPS, "done": True}
  return jax.device_get(state)


@pytest.mark.slow
def test_two_processes_equal_one_process(runs, tmp_path):
  one = _comparable(read_jsonl(str(runs["one"] / "metrics.jsonl")))
  two = _comparable(read_jsonl(str(runs["two"] / "metrics.jsonl")))
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], (float, list)):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
      else:
        assert b[key] == a[key], key
  assert [r["reward/mean"] for r in two] == [r["reward/mean"] for r in one]  # same samples
  state_one = _final_state(runs["one"], tmp_path / "a")
  state_two = _final_state(runs["two"], tmp_path / "b")
  for x, y in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_two)):
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-5)
  # Only process 0 speaks; process 1 prints nothing of ours.
  assert "corpo_jax: finished rl" in runs["rerun_out"][0]
  assert "corpo_jax:" not in runs["rerun_out"][1]


@pytest.mark.slow
def test_killed_process_stops_the_other_and_rerun_resumes(runs):
  log = _readable(runs["survivor_out"])  # shown should an assertion fail
  assert runs["survivor_rc"] != 0, log
  assert runs["survivor_s"] < EXIT_BOUND_S, log
  assert "another task died" in runs["survivor_out"], log  # JAX's distributed service says so
  resumed = [int(line.rsplit(" ", 1)[1]) for line in runs["rerun_out"][0].splitlines()
             if "resuming from the checkpoint at step" in line]
  assert len(resumed) == 1 and 2 <= resumed[0] < STEPS
