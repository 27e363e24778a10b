"""Checkpointer: exact round trip, restore onto another mesh, data iterator resume, errors;
the SIGTERM handlers (flag, default action, JAX's preemption notifier)."""

import os
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import sharding
from corpo_jax.train.checkpoint import Checkpointer, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(mesh):
  rng = np.random.default_rng(0)
  w = jax.device_put(rng.normal(size=(8, 16)).astype(np.float32),
                     sharding.named_sharding(mesh, ("embed", "mlp"), (8, 16)))
  step = jax.device_put(jnp.asarray(7, jnp.int32), sharding.replicated(mesh))
  return {"params": {"w": w}, "step": step}


def _loader(seed=0):
  source = grain.sources.RangeDataSource(0, 100, 1)
  return grain.DataLoader(
      data_source=source, sampler=grain.samplers.IndexSampler(
          num_records=100, shuffle=True, seed=seed, num_epochs=1,
          shard_options=grain.sharding.NoSharding()),
      operations=[grain.transforms.Batch(batch_size=4)], worker_count=0)


def test_round_trip_onto_another_mesh_and_iterator_resume(tmp_path):
  state = _state(sharding.make_mesh((4, 2, 1, 1)))
  it = iter(_loader())
  seen = [next(it) for _ in range(3)]
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, {"stage": "rl", "stage_step": 3}, it)
  ckpt.wait()
  expected_next = [next(it) for _ in range(2)]

  for shape in [(2, 4, 1, 1), (1, 1, 1, 8)]:
    target = abstract_like(_state(sharding.make_mesh(shape)))
    it2 = iter(_loader())
    restored, meta = Checkpointer(str(tmp_path / "ckpt")).restore(3, target, it2)
    assert meta == {"stage": "rl", "stage_step": 3}
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                  np.asarray(state["params"]["w"]))
    assert restored["params"]["w"].sharding == target["params"]["w"].sharding
    assert int(restored["step"]) == 7
    for want in expected_next:
      np.testing.assert_array_equal(next(it2), want)
  assert len(seen) == 3


def test_keeps_n_and_latest(tmp_path):
  state = _state(sharding.make_mesh((8, 1, 1, 1)))
  ckpt = Checkpointer(str(tmp_path / "c"), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {"stage": "sft"})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "c"))
  assert ckpt.all_steps() == [2, 3]
  assert ckpt.latest_step() == 3


def test_shape_mismatch_is_a_clear_error(tmp_path):
  mesh = sharding.make_mesh((8, 1, 1, 1))
  ckpt = Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, _state(mesh), {})
  ckpt.wait()
  wrong = {"params": {"w": jax.ShapeDtypeStruct((8, 32), jnp.float32,
                                               sharding=sharding.replicated(mesh))},
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
  with pytest.raises(ValueError, match="does not match this run"):
    ckpt.restore(1, wrong)


def test_unwritable_directory_is_a_clear_error(tmp_path):
  if os.geteuid() == 0:
    path = "/proc/corpo_jax_ckpt"  # not creatable even for root
  else:
    os.chmod(tmp_path, 0o500)
    path = str(tmp_path / "c")
  with pytest.raises(ValueError, match="writable"):
    Checkpointer(path)


def test_small_replicated_arrays_are_written_without_per_replica_slice_programs(tmp_path, caplog):
  """Orbax's replica-parallel write slices a replicated array once per replica, one compiled
  program per slice shape; below MIN_REPLICA_SLICE_BYTES the save compiles no slice at all."""
  mesh = sharding.make_mesh((8, 1, 1, 1))
  state = {f"b{n}": jax.device_put(jnp.arange(8 * n, dtype=jnp.float32), sharding.replicated(mesh))
           for n in range(1, 5)}  # four shapes, each divisible over the 8 replicas
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
    ckpt.save(1, state, {"stage": "sft"})
    ckpt.close()
  compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not [m for m in compiled if "slice" in m], compiled
  restored, _ = Checkpointer(str(tmp_path / "ckpt")).restore(1, abstract_like(state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_importing_the_checkpointer_logs_no_orbax_override_warning():
  out = subprocess.run([sys.executable, "-c", "import corpo_jax.train.checkpoint"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  assert "overriding" not in out.stderr + out.stdout, out.stderr


def _wait_for(proc, line):
  got = proc.stdout.readline().strip()
  assert got == line, got + proc.stdout.read()


def _signal_after(proc, line):
  _wait_for(proc, line)
  proc.send_signal(signal.SIGTERM)
  return time.perf_counter()


_FLAG_THEN_TERMINATE = """
import time
from corpo_jax.train import checkpoint
checkpoint.install_sigterm_handler()
with checkpoint.terminate_on_sigterm():
  pass
print("flag handler back", flush=True)
deadline = time.time() + 30
while not checkpoint.sigterm_received() and time.time() < deadline:
  time.sleep(0.01)
print("flag", checkpoint.sigterm_received(), flush=True)
with checkpoint.terminate_on_sigterm():
  print("terminating", flush=True)
  time.sleep(30)
print("survived", flush=True)
"""


def test_sigterm_sets_the_flag_outside_terminate_on_sigterm_and_kills_inside():
  proc = subprocess.Popen([sys.executable, "-c", _FLAG_THEN_TERMINATE], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _signal_after(proc, "flag handler back")
  _wait_for(proc, "flag True")  # the flag handler ran; the process lives on
  t0 = _signal_after(proc, "terminating")
  assert proc.wait(timeout=10) == -signal.SIGTERM, proc.stdout.read()
  assert time.perf_counter() - t0 < 5  # not the 30 s sleep
  assert proc.stdout.read() == ""


_DISTRIBUTED = """
import itertools, sys, time
import jax
from jax.experimental import multihost_utils
from corpo_jax.train import checkpoint
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=1, process_id=0)
with checkpoint.terminate_on_sigterm():
  with checkpoint.terminate_on_sigterm():
    pass
  checkpoint.install_sigterm_handler()  # JAX's preemption notifier, replaced by the outer block
  print("notifier back", flush=True)
  deadline = time.time() + 30
  for step in itertools.count():
    if multihost_utils.reached_preemption_sync_point(step) or time.time() > deadline:
      break
    time.sleep(0.01)
  print("preemption notice", time.time() < deadline, "flag", checkpoint.sigterm_received(),
        flush=True)
  with checkpoint.terminate_on_sigterm():
    print("terminating", flush=True)
    time.sleep(30)
"""


def test_terminate_on_sigterm_keeps_jax_distributed_preemption_notifier():
  """jax.distributed.initialize installs a C++ SIGTERM handler (the multi-process preemption
  notice) that Python's signal module cannot see; terminate_on_sigterm overrides it inside the
  block and puts it back after, and install_sigterm_handler keeps it."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-c", _DISTRIBUTED, str(port)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  _signal_after(proc, "notifier back")
  _wait_for(proc, "preemption notice True flag False")
  t0 = _signal_after(proc, "terminating")
  assert proc.wait(timeout=10) == -signal.SIGTERM, proc.stdout.read()
  assert time.perf_counter() - t0 < 5
