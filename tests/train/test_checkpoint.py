"""Checkpointer: exact round trip, restore onto another mesh, data iterator resume, errors;
the SIGTERM handlers (flag, default action, JAX's preemption notifier); checksums, each kind of
damage to the newest step and the fallback to the previous one, a full disk."""

import hashlib
import itertools
import json
import os
import re
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
from corpo_jax.train import checkpoint
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
from corpo_jax.train import preemption
preemption.install_sigterm_handler()
with preemption.terminate_on_sigterm():
  pass
print("flag handler back", flush=True)
deadline = time.time() + 30
while not preemption.sigterm_received() and time.time() < deadline:
  time.sleep(0.01)
print("flag", preemption.sigterm_received(), flush=True)
with preemption.terminate_on_sigterm():
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
from corpo_jax.train import preemption
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=1, process_id=0)
with preemption.terminate_on_sigterm():
  with preemption.terminate_on_sigterm():
    pass
  preemption.install_sigterm_handler()  # JAX's preemption notifier, replaced by the outer block
  print("notifier back", flush=True)
  deadline = time.time() + 30
  for step in itertools.count():
    if multihost_utils.reached_preemption_sync_point(step) or time.time() > deadline:
      break
    time.sleep(0.01)
  print("preemption notice", time.time() < deadline, "flag", preemption.sigterm_received(),
        flush=True)
  with preemption.terminate_on_sigterm():
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


# ----------------------------------------------------------------------------- checksums, damage


def _record(directory, step):
  with open(os.path.join(directory, str(step), "_CHECKPOINT_METADATA")) as f:
    return json.load(f)["custom_metadata"][checkpoint.CHECKSUMS]


def test_checksums_do_not_depend_on_the_mesh_and_change_with_any_value():
  values = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  sums = []
  for shape in [(8, 1, 1, 1), (4, 2, 1, 1), (1, 1, 1, 8)]:
    mesh = sharding.make_mesh(shape)
    w = jax.device_put(values, sharding.named_sharding(mesh, ("embed", "mlp"), (8, 16)))
    sums.append(checkpoint.checksums({"w": w, "n": jnp.arange(5, dtype=jnp.int32)}))
  assert sums[0] == sums[1] == sums[2]
  assert sums[0][1] == {"w": 0, "n": 0}
  for i, j, new in [(0, 0, values[0, 0] * (1 + 2**-23)), (3, 7, -values[3, 7]), (7, 15, np.nan)]:
    changed = values.copy()
    changed[i, j] = new
    got, nonfinite = checkpoint.checksums({"w": jnp.asarray(changed)})
    assert got["w"] != sums[0][0]["w"]
    assert nonfinite["w"] == int(np.isnan(new))
  swapped = values.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere
  assert checkpoint.checksums({"w": jnp.asarray(swapped)})[0]["w"] != sums[0][0]["w"]


def test_every_save_records_shapes_checksums_and_digests(tmp_path):
  state = _state(sharding.make_mesh((4, 2, 1, 1)))
  it = iter(_loader())
  next(it)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, state, {"stage": "rl"}, it)
  ckpt.close()
  record = _record(tmp_path, 1)
  sums, _ = checkpoint.checksums(state)
  assert record["arrays"] == {
      "params/w": {"shape": [8, 16], "dtype": "float32", "checksum": sums["params/w"]},
      "step": {"shape": [], "dtype": "int32", "checksum": sums["step"]}}
  data = (tmp_path / "1" / "data" / "process_0-of-1.json").read_bytes()
  assert record["data"] == [hashlib.sha256(data).hexdigest()]
  assert record["meta"] == hashlib.sha256(b'{"stage": "rl"}').hexdigest()


def test_a_step_saved_before_checksums_restores_unverified_with_a_warning(tmp_path, caplog):
  """Older workdirs resume: a step whose metadata has no checksum record (as every step had
  before checksums were recorded) restores its values, with a warning that nothing was checked."""
  state = _state(sharding.make_mesh((8, 1, 1, 1)))
  ckpt = Checkpointer(str(tmp_path / "c"))
  ckpt.save(2, state, {"stage": "rl"})
  ckpt.close()
  path = tmp_path / "c" / "2" / "_CHECKPOINT_METADATA"
  with open(path) as f:
    metadata = json.load(f)
  metadata["custom_metadata"] = {}
  with open(path, "w") as f:
    json.dump(metadata, f)
  with caplog.at_level("WARNING"):
    restored, meta = Checkpointer(str(tmp_path / "c")).restore(2, abstract_like(state))
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  assert meta == {"stage": "rl"} and int(restored["step"]) == 7
  assert "saved before checksums were recorded: restored without verification" in caplog.text


def test_a_state_with_nan_is_refused_and_nothing_is_written(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  state = {"w": jnp.asarray([1.0, np.nan, np.inf]), "b": jnp.ones(2), "step": jnp.asarray(3)}
  with pytest.raises(checkpoint.NonFiniteState,
                     match=r"^2 non-finite values in 1 arrays \(w: 2\)$"):
    ckpt.save(3, state, {"stage": "sft"})
  ckpt.close()
  assert os.listdir(tmp_path) == []


def _biggest(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _biggest(os.path.join(step_dir, "state"))
  os.truncate(path, os.path.getsize(path) // 2)


def _overwrite(step_dir):
  path = os.path.join(step_dir, "state", "manifest.ocdbt")
  open(path, "wb").write(b"\0" * os.path.getsize(path))


def _flip_bit(step_dir):
  """One bit in the middle of the file holding the array values (stored raw: random floats do
  not compress), which reads back without any error."""
  path = _biggest(os.path.join(step_dir, "state"))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(data)


# damage -> (the file named, the cause) in the report
DAMAGE = {
    "truncate": (_truncate, r"state/ocdbt\.process_0/d/\w+|state", r"byte range|Truncated"),
    "overwrite": (_overwrite, r"state/manifest\.ocdbt", "Error decoding manifest"),
    "flip_one_bit": (_flip_bit, "state", r"the restored values of 1 arrays \(params/w\) do not "
                     r"match their checksums"),
    "delete_meta": (lambda d: os.remove(os.path.join(d, "meta", "metadata")), "meta/metadata",
                    "missing"),
    "delete_data_state": (lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")),
                          r"data/process_0-of-1\.json", "missing"),
    "edit_data_state": (lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "a").write(
        " "), r"data/process_0-of-1\.json", "do not match the recorded SHA-256"),
    "incomplete": (lambda d: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")),
                   "_CHECKPOINT_METADATA", r"missing \(the save did not complete\)"),
}


def _big_state(mesh, k):
  """Random params (a file of raw float bytes) that differ per step, and the step."""
  w = np.random.default_rng(k).normal(size=(64, 64)).astype(np.float32)
  return {"params": {"w": jax.device_put(w, sharding.named_sharding(mesh, ("embed", "mlp"),
                                                                    (64, 64)))},
          "step": jax.device_put(jnp.asarray(k, jnp.int32), sharding.replicated(mesh))}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_step_is_reported_set_aside_and_the_previous_one_used(tmp_path, damage):
  """Steps 2 and 4 of a stream; step 4 damaged. The restore names step 4, the file and the cause,
  moves step 4 (every file kept) into damaged/, and returns step 2 exactly, with the data
  iterator where it was at step 2; max_to_keep=2 then keeps step 2 until two new saves."""
  damage_fn, file, cause = DAMAGE[damage]
  mesh = sharding.make_mesh((4, 2, 1, 1))
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  it = iter(_loader())
  after = {}
  for k in (2, 4):
    next(it), next(it)
    ckpt.save(k, _big_state(mesh, k), {"stage": "rl", "step": k}, it)
    ckpt.wait()
    after[k] = [np.asarray(x) for x in itertools.islice(iter(_loader()), k, k + 2)]
  ckpt.close()
  damage_fn(str(tmp_path / "4"))
  files = sorted(str(p.relative_to(tmp_path / "4")) for p in (tmp_path / "4").rglob("*"))

  rerun, it2, reports = Checkpointer(str(tmp_path), max_to_keep=2), iter(_loader()), []
  step, state, meta = rerun.restore_latest(abstract_like(_big_state(mesh, 0)), it2,
                                           set_aside=True, report=reports.append)
  assert (step, meta) == (2, {"stage": "rl", "step": 2})
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
               jax.device_get(_big_state(mesh, 2)))
  for want in after[2]:
    np.testing.assert_array_equal(next(it2), want)
  assert len(reports) == 1, reports
  assert re.fullmatch(rf"checkpoint {tmp_path}/4 is damaged \(({file}): .*({cause}).*\); moved "
                      rf"to {tmp_path}/damaged/4; using step 2", reports[0]), reports[0]
  assert sorted(str(p.relative_to(tmp_path / "damaged" / "4"))
                for p in (tmp_path / "damaged" / "4").rglob("*")) == files  # nothing deleted
  assert rerun.all_steps() == [2]
  rerun.save(4, _big_state(mesh, 4), {"stage": "rl", "step": 4})
  rerun.wait()
  assert rerun.all_steps() == [2, 4]  # step 2 kept: the damaged step no longer counts
  rerun.close()


def _two_steps(directory, flip_newest=True):
  """Steps 1 and 2 of `_big_state` in `directory` (one bit of step 2's values flipped); the
  mesh they were saved from."""
  mesh = sharding.make_mesh((8, 1, 1, 1))
  ckpt = Checkpointer(str(directory))
  for k in (1, 2):
    ckpt.save(k, _big_state(mesh, k), {"stage": "rl"})
  ckpt.close()
  if flip_newest:
    _flip_bit(str(directory / "2"))
  return mesh


def test_every_step_damaged_is_an_error_listing_them_and_moves_nothing(tmp_path):
  mesh = _two_steps(tmp_path)
  os.remove(tmp_path / "1" / "meta" / "metadata")
  rerun = Checkpointer(str(tmp_path))
  with pytest.raises(ValueError, match=rf"No intact checkpoint under {tmp_path}: step 2: state: "
                     r"the restored values .*; step 1: meta/metadata: missing\. Restore the "
                     r"files, or move the directory away"):
    rerun.restore_latest(abstract_like(_big_state(mesh, 0)), set_aside=True, report=print)
  assert rerun.all_steps() == [1, 2] and not (tmp_path / "damaged").exists()


def test_a_restore_in_a_new_process_finds_the_flipped_bit(tmp_path):
  """The rerun of a real run is a new process (no tensorstore cache shared with the save)."""
  _two_steps(tmp_path)
  code = f"""
import jax, jax.numpy as jnp
from corpo_jax import sharding
from corpo_jax.train.checkpoint import Checkpointer
mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
target = {{"params": {{"w": jax.ShapeDtypeStruct((64, 64), jnp.float32,
                                                 sharding=sharding.replicated(mesh))}},
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}}
step, state, _ = Checkpointer({str(tmp_path)!r}).restore_latest(target, set_aside=False,
                                                                report=print)
print("restored", step, int(state["step"]))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[-2:] == [
      f"checkpoint {tmp_path}/2 is damaged (state: the restored values of 1 arrays (params/w) do "
      f"not match their checksums); using step 1", "restored 1 1"]
  assert (tmp_path / "2").is_dir()  # set_aside=False (the eval CLI) moves nothing


def test_a_changed_model_is_not_damage(tmp_path):
  """A step that restores into another layout names the arrays and does not fall back."""
  mesh = _two_steps(tmp_path, flip_newest=False)
  target = abstract_like(_big_state(mesh, 0))
  target["params"]["w"] = jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                               sharding=sharding.replicated(mesh))
  with pytest.raises(ValueError, match=r"Checkpoint .*/2 does not match this run's state \(model "
                     r"or optimizer config changed\?\): params/w float32\[64, 64\] \(this run: "
                     r"float32\[64, 32\]\)\. Use a fresh --config\.workdir"):
    Checkpointer(str(tmp_path)).restore_latest(target, set_aside=True, report=print)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


_FULL_DISK = """
import os, sys
import jax
from corpo_jax.train.checkpoint import Checkpointer
state = {"w": jax.random.normal(jax.random.key(0), (256, 1024))}  # 1 MiB of incompressible floats
ckpt = Checkpointer(sys.argv[1], max_to_keep=9)
try:
  for k in range(1, 9):
    ckpt.save(k, state, {"stage": "rl"})
    ckpt.wait()
except ValueError as e:
  print("ERROR", e)
print("steps", Checkpointer(sys.argv[1]).all_steps())
"""


def test_a_full_disk_during_a_save_is_one_clear_error_on_a_real_tmpfs(tmp_path):
  """A 3 MiB tmpfs (a mount namespace of an unprivileged user namespace): orbax's background
  write fails in tensorstore (RESOURCE_EXHAUSTED, not an OSError)."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  command = (f"mount -t tmpfs -o size=3m tmpfs {mnt} && {sys.executable} -c '{_FULL_DISK}' "
             f"{mnt}/ckpt")
  out = subprocess.run(["unshare", "-Urm", "sh", "-c", command], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if out.returncode and "unshare" in out.stderr:
    pytest.skip(f"no user namespace here: {out.stderr.strip()}")
  error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
  steps = re.fullmatch(r"steps \[(.*)\]", out.stdout.splitlines()[-1]).group(1)
  assert steps.startswith("1, 2"), out.stdout  # some fit first (zarr compresses a little)
  assert re.fullmatch(rf"ERROR Writing a checkpoint under {mnt}/ckpt failed: Failed to write \d+ "
                      rf"bytes to file \d+: No space left on device \[os_error_code='28'\] "
                      rf"\(writing {mnt}/ckpt/\d+\.orbax-checkpoint-tmp/.*\)\. The complete "
                      rf"checkpoints \(steps \[{steps}\]\) are intact; free disk space or fix the "
                      r"permissions, then rerun to resume from the latest\.", error), error
  noise = [line for line in out.stderr.splitlines() if not line.startswith(("W0", "I0"))]
  assert len(noise) < 10, out.stderr


_WATCHDOG = """
import sys, time
import jax, jax.numpy as jnp
from corpo_jax.train import preemption
preemption.SIGTERM_GRACE_S = float(sys.argv[1])
preemption.install_sigterm_handler()
for _ in range(3):  # steps of ~50 ms
  assert not preemption.sigterm_received()
  time.sleep(0.05)
if sys.argv[2] == "blocked":  # the main thread sits in XLA for good (as in a hung collective)
  # counts in float32 up to `limit`: 0 returns at once, 1e30 never (c + 1 == c from 2**24 on)
  spin = jax.jit(lambda limit: jax.lax.while_loop(lambda c: c < limit, lambda c: c + 1.0,
                                                  jnp.float32(0)))
  spin(0.0).block_until_ready()  # compiled before the signal
  print("blocked", flush=True)
  spin(1e30).block_until_ready()
else:  # a step boundary sees the flag, then the save takes longer than the grace
  print("stepping", flush=True)
  while not preemption.sigterm_received():
    time.sleep(0.05)
  time.sleep(3 * preemption.SIGTERM_GRACE_S)
  print("saved", flush=True)
"""


def _watchdog(grace, mode):
  return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(grace), mode], cwd=ROOT,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_sigterm_while_blocked_in_xla_ends_the_process_after_the_grace():
  """Was: the flag handler never ran while the main thread was inside XLA, so the process
  ignored SIGTERM for as long as it stayed there."""
  proc = _watchdog(1.0, "blocked")
  _wait_for(proc, "blocked")
  time.sleep(1)  # inside the second call
  proc.send_signal(signal.SIGTERM)
  t0 = time.perf_counter()
  assert proc.wait(timeout=30) == -signal.SIGTERM
  assert 1.0 <= time.perf_counter() - t0 < 8  # the grace (1 s + 2 x 50 ms steps), not minutes


def test_a_second_sigterm_ends_a_blocked_process_at_once():
  proc = _watchdog(600.0, "blocked")
  _wait_for(proc, "blocked")
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  t0 = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == -signal.SIGTERM
  assert time.perf_counter() - t0 < 5


def test_once_a_step_boundary_saw_sigterm_the_save_takes_as_long_as_it_needs():
  proc = _watchdog(1.0, "stepping")
  _signal_after(proc, "stepping")
  assert proc.wait(timeout=60) == 0  # 3 s of "saving" past the 1 s grace
  assert proc.stdout.read() == "saved\n"
