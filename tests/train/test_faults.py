"""Numerical guards, bad input and disk faults of the trainer, one run per workdir, a damaged
newest checkpoint end to end (docs/reliability.md)."""

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from configs import grpo as grpo_config
from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import checkpoint, loop, optim
from corpo_jax.train import setup as setup_lib
from corpo_jax.train import sft as sft_lib
from corpo_jax.train import state as state_lib
from corpo_jax.train import workdir as workdir_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sft_only(workdir, **sft):
  config = grpo_config.get_config("smoke")
  config.workdir = str(workdir)
  config.stages = ("sft",)
  config.eval.tasks = ()
  config.log.progress = False
  config.sft.update(sft)
  return config


@pytest.mark.slow
def test_too_many_skipped_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  # lr 1e30: step 1 applies and blows the parameters up; every later loss is NaN and skipped.
  config = _sft_only(tmp_path, steps=8, checkpoint_every=2, learning_rate=1e30, warmup_steps=0,
                     max_skipped_steps=2)
  with pytest.raises(ValueError, match=r"3 optimizer steps up to step 4 .* more than "
                     r"config\.sft\.max_skipped_steps=2; the last good checkpoint is step 2"):
    loop.run(config)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["skipped"], r["applied"]) for r in rows] == [
      (1, 0, 1.0), (2, 1, 0.0), (3, 2, 0.0), (4, 3, 0.0)]
  assert Checkpointer(str(tmp_path / "checkpoints" / "sft")).all_steps() == [2]


def test_negative_skip_limit_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"config\.sft\.max_skipped_steps=-1 must be >= 0"):
    setup_lib.check_config(_sft_only(tmp_path, max_skipped_steps=-1))


@pytest.mark.slow
def test_checkpoint_from_mesh_4x2_restores_onto_2x4_and_1_device_and_continues_equally(tmp_path):
  cfg = ModelConfig.preset("tiny", num_layers=1)
  opt_cfg = RLConfig(learning_rate=1e-2)
  optimizer = optim.make_optimizer(opt_cfg, model.abstract_params(cfg))
  rng = np.random.default_rng(0)
  positions_T = np.arange(16)
  batch = sft_lib.SftBatch(  # 8 rows: 4 prompt tokens, 6 trace tokens, 6 answer tokens
      tokens=jnp.asarray(rng.integers(6, cfg.vocab_size, (8, 16)), jnp.int32),
      token_mask=jnp.ones((8, 16), bool),
      trace_mask=jnp.asarray(np.broadcast_to((positions_T >= 4) & (positions_T < 10), (8, 16))),
      answer_mask=jnp.asarray(np.broadcast_to(positions_T >= 10, (8, 16))),
      step_labels=jnp.zeros((8, 16), jnp.int32))

  def update(mesh):
    return sft_lib.make_sft_update(cfg, opt_cfg, optimizer, mesh, loss_on=("trace", "answer"),
                                   step_loss_weight=0.1)

  def abstract(mesh):
    return state_lib.abstract_state(cfg, optimizer, mesh)

  mesh = sharding.make_mesh((4, 2, 1, 1))
  state = state_lib.init_state(cfg, optimizer, model.init_params(cfg, jax.random.key(0), mesh),
                               mesh)

  @jax.jit
  def adam_step(state):  # a non-trivial optimizer state without compiling the model
    grads = jax.tree.map(lambda p: jnp.sin(1e3 * p), state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1)

  state = adam_step(state)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, state, {"stage": "sft"})
  ckpt.close()
  saved = jax.device_get(state)
  continued = []
  for shape, devices in (((2, 4, 1, 1), None), ((1, 1, 1, 1), jax.devices()[:1])):
    target = sharding.make_mesh(shape, devices)
    restored, _ = Checkpointer(str(tmp_path)).restore(1, abstract(target))
    leaves = jax.tree.leaves(restored)
    assert all(x.sharding == t.sharding for x, t in zip(leaves, jax.tree.leaves(abstract(target))))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)  # bit-identical
    continued.append(jax.device_get(update(target)(restored, batch)[0]))
  assert [int(c.step) for c in continued] == [2, 2] and int(continued[0].skipped) == 0
  # The next step on (2, 4) and on one device: equal up to the order of float32 reductions.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               (continued[0].params, continued[0].opt_state),
               (continued[1].params, continued[1].opt_state))
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(continued[0].params),
                                                      jax.tree.leaves(saved.params)))  # it trained


def test_disk_full_during_an_async_save_is_a_clear_error_and_keeps_earlier_checkpoints(
    tmp_path, monkeypatch):
  state = {"w": jnp.arange(8.0), "step": jnp.asarray(1, jnp.int32)}
  ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(1, state, {"stage": "rl"})
  ckpt.wait()

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  ckpt.save(2, {**state, "w": state["w"] + 1}, {"stage": "rl"})  # the write fails in the background
  with pytest.raises(ValueError, match=r"No space left on device\. The complete checkpoints "
                     r"\(steps \[1\]\) are intact; free disk space"):
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()
  rerun = Checkpointer(str(tmp_path))
  assert rerun.latest_step() == 1
  restored, meta = rerun.restore(1, checkpoint.abstract_like(state))
  rerun.close()
  np.testing.assert_array_equal(restored["w"], np.arange(8.0))
  assert meta == {"stage": "rl"}


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  config = _sft_only(tmp_path / "file" / "run")
  with pytest.raises(ValueError, match=r"Cannot write to --config\.workdir=.*file/run.*choose a "
                     r"writable directory"):
    setup_lib.setup(config)


def test_disk_full_writing_config_json_keeps_the_old_one(tmp_path, monkeypatch):
  config = _sft_only(tmp_path)
  setup_lib.setup(config)
  old = (tmp_path / "config.json").read_text()
  config.sft.steps = 99
  real_replace = os.replace

  def full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", full)
  with pytest.raises(ValueError, match="No space left on device"):
    setup_lib.setup(config)
  monkeypatch.setattr(os, "replace", real_replace)
  assert (tmp_path / "config.json").read_text() == old
  assert not (tmp_path / "config.json.tmp").exists()  # was: left behind, 0 bytes


# ----------------------------------------------------------------------------- non-finite state


@pytest.mark.slow
def test_a_nan_parameter_after_an_update_stops_the_run_and_the_stage_is_never_done(tmp_path,
                                                                                  monkeypatch):
  """The update of step 3 leaves params/embed NaN (injected: a finite config cannot be trusted
  to produce it). Step 4's loss is then NaN and skipped (1 <= max_skipped_steps), so only the
  save refuses it: the final checkpoint, which would mark sft done, is not written."""
  make = sft_lib.make_sft_update

  def poisoning(*args, **kwargs):
    update = make(*args, **kwargs)

    def poisoned(state, batch):
      state, metrics = update(state, batch)
      if int(state.step) == 3:
        params = dict(state.params, embed=state.params["embed"] * jnp.nan)
        state = state.replace(params=type(state.params)(params))
      return state, metrics
    return poisoned

  monkeypatch.setattr(sft_lib, "make_sft_update", poisoning)
  config = _sft_only(tmp_path, steps=4, checkpoint_every=2)
  with pytest.raises(ValueError, match=r"^stage sft: after step 4 the train state holds \d+ "
                     r"non-finite values in 1 arrays \(params/embed: \d+\); it was not saved and "
                     r"the stage is not marked done; the last good checkpoint is step 2 in "
                     rf"{tmp_path}/checkpoints/sft\. Lower config\.sft\.learning_rate"):
    loop.run(config)
  ckpt = Checkpointer(str(tmp_path / "checkpoints" / "sft"))
  assert ckpt.all_steps() == [2] and ckpt.restore_meta(2) == {"stage": "sft", "step": 2,
                                                              "done": False}
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (4, 1)]


# ----------------------------------------------------------------------------- full disk


def _disk_full_for(suffix, real_open=open):
  """open() that fails with ENOSPC when appending to a file whose name ends with `suffix`."""
  def fake(file, mode="r", *args, **kwargs):
    if str(file).endswith(suffix) and mode.startswith("a"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return real_open(file, mode, *args, **kwargs)
  return fake


@pytest.mark.slow
def test_a_full_disk_writing_metrics_or_eval_rows_is_a_clear_error_and_loses_nothing(
    tmp_path, monkeypatch):
  """metrics.jsonl full from step 3, then eval.jsonl full at the stage's end: each stops the run
  with the friendly error naming the file; the rerun resumes from checkpoint 2 and writes every
  row once (was: a raw OSError and, for eval.jsonl, an uncaught one)."""
  config = _sft_only(tmp_path, steps=4, checkpoint_every=2)
  write = setup_lib.MetricsWriter.write

  def full_from_3(self, step, stage, metrics):
    if step >= 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    return write(self, step, stage, metrics)

  message = (r"^Writing {} failed: \[Errno 28\] No space left on device\. The complete checkpoints "
             rf"under {tmp_path}/checkpoints are intact; free disk space, then rerun the same "
             r"command to resume from the latest\.$")
  monkeypatch.setattr(setup_lib.MetricsWriter, "write", full_from_3)
  with pytest.raises(ValueError, match=message.format(re.escape(f"{tmp_path}/metrics.jsonl"))):
    loop.run(config)
  monkeypatch.undo()
  monkeypatch.setattr("builtins.open", _disk_full_for("eval.jsonl"))
  with pytest.raises(ValueError, match=message.format(re.escape(f"{tmp_path}/eval.jsonl"))):
    loop.run(config)
  monkeypatch.undo()
  assert Checkpointer(str(tmp_path / "checkpoints" / "sft")).all_steps() == [2]  # not done
  loop.run(config)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_disk_full_rewriting_a_log_keeps_it_and_leaves_no_temp_file(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"stage": "sft", "step": 1}\n{"stage": "sft", "step": 2}\n')

  def full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", full)
  with pytest.raises(OSError, match="No space left"):
    loop._drop_rows_after(str(path), "sft", 1)
  monkeypatch.undo()
  assert path.read_text() == '{"stage": "sft", "step": 1}\n{"stage": "sft", "step": 2}\n'
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


# ----------------------------------------------------------------------------- one run per workdir


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder_until_it_ends(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom corpo_jax.train import workdir\n"
       "workdir.lock(sys.argv[1], print)\nprint('locked', flush=True)\ntime.sleep(120)",
       str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "locked\n"
  config = _sft_only(tmp_path)
  with pytest.raises(workdir_lib.WorkdirBusy, match=(
      rf"^--config\.workdir='{tmp_path}' is in use by another run: pid {holder.pid} on host "
      rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "
      rf"\(command: -c {tmp_path}\)\. Wait for it to finish or stop it, or choose another "
      r"--config\.workdir\.$")):
    setup_lib.setup(config)
  assert os.listdir(tmp_path) == ["run.lock"]  # no config.json, no metrics
  holder.kill()
  holder.wait()
  setup_lib.setup(config)  # the kernel dropped the lock with its holder (kill -9): no stale lock
  assert (tmp_path / "config.json").exists()
  setup_lib.setup(config)  # this process holds it: a rerun in the same process (tests) is fine


def test_a_second_trainer_exits_2_within_seconds(tmp_path):
  workdir_lib.lock(str(tmp_path), print)  # this test process is the first run
  t0 = time.perf_counter()
  out = subprocess.run(_main(tmp_path), cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2, out.stderr
  assert (f"corpo_jax: error: --config.workdir='{tmp_path}' is in use by another run: pid "
          f"{os.getpid()} on host {socket.gethostname()}") in out.stderr
  assert time.perf_counter() - t0 < 60  # the python and jax start-up; measured ~4 s idle
  assert os.listdir(tmp_path) == ["run.lock"]


# ----------------------------------------------------------------------------- end to end


WALL_CLOCK_KEYS = ("time", "time/step_s", "time/rollout_s", "tokens_per_s", "time/eta_s")


def _main(workdir, *extra, main="corpo_jax.main"):
  return [sys.executable, "-m", main, *extra, "--config=configs/grpo.py:smoke",
          f"--config.workdir={workdir}", "--config.stages=('sft',)", "--config.sft.steps=4",
          "--config.sft.checkpoint_every=1", "--config.checkpoint.async_save=false",
          "--config.eval.tasks=()", "--config.log.progress=false"]


def _comparable(workdir):
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}
          for r in read_jsonl(str(workdir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """An uninterrupted run (the reference), stopped (SIGSTOP) right after its first metrics row
  while a second run is started on its workdir, then continued."""
  workdir = tmp_path_factory.mktemp("first")
  first = subprocess.Popen(_main(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() or not read_jsonl(str(workdir / "metrics.jsonl")):
    assert first.poll() is None and time.time() < deadline, first.stdout.read()
    time.sleep(0.05)
  first.send_signal(signal.SIGSTOP)
  t0 = time.perf_counter()
  second = subprocess.run(_main(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
  second_s = time.perf_counter() - t0
  first.send_signal(signal.SIGCONT)
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out
  return workdir, second, second_s, first.pid


@pytest.mark.slow
def test_two_concurrent_runs_the_second_exits_2_and_the_first_is_unaffected(uninterrupted):
  workdir, second, second_s, first_pid = uninterrupted
  assert second.returncode == 2, second.stderr
  assert f"is in use by another run: pid {first_pid} on host" in second.stderr
  assert second_s < 60, second_s  # measured: 4-9 s, the python and jax start-up
  rows = _comparable(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each row once
  assert Checkpointer(str(workdir / "checkpoints" / "sft")).restore_meta(4)["done"]


def _biggest_state_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _biggest_state_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _flip_bit(step_dir):
  path = _biggest_state_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(data)


# damage of the newest step -> (the file the report names, its cause)
DAMAGE = {
    "truncate": (_truncate, r"state[\w/.]*", r"byte range|Truncated|ZSTD"),
    "overwrite": (lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"\0" * 114),
                  r"state/manifest\.ocdbt", "Error decoding manifest"),
    # restores without any error: only the checksum tells
    "flip_one_bit": (_flip_bit, "state", r"the restored values of 1 arrays \([\w/]+\) do not "
                     r"match their checksums"),
    "delete_meta": (lambda d: os.remove(d / "meta" / "metadata"), r"meta/metadata", "missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_step_is_set_aside_and_the_rerun_equals_the_uninterrupted_run(
    uninterrupted, tmp_path, damage):
  """kill -9 right after checkpoint 3 (with 2 kept, max_to_keep 2), then step 3 damaged: the
  rerun reports it, moves it (every file kept) to damaged/3, resumes from step 2 and its
  metrics equal the uninterrupted run's."""
  out = subprocess.run(_main(tmp_path, "save:sft:3", main="tests.train.crash_main"), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == -signal.SIGKILL, out.stderr
  ckpt_dir = tmp_path / "checkpoints" / "sft"
  assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
  damage_fn, file, cause = DAMAGE[damage]
  damage_fn(ckpt_dir / "3")
  files = {p.relative_to(ckpt_dir / "3"): p.read_bytes() for p in (ckpt_dir / "3").rglob("*")
           if p.is_file()}
  out = subprocess.run(_main(tmp_path), cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert re.search(rf"corpo_jax: stage sft: checkpoint {ckpt_dir}/3 is damaged \(({file}): "
                   rf".*({cause}).*\); moved to {ckpt_dir}/damaged/3; using step 2\n",
                   out.stderr), out.stderr
  assert "stage sft: resuming from the checkpoint at step 2" in out.stderr
  assert _comparable(tmp_path) == _comparable(uninterrupted[0])
  assert {p.relative_to(ckpt_dir / "damaged" / "3"): p.read_bytes()
          for p in (ckpt_dir / "damaged" / "3").rglob("*") if p.is_file()} == files
