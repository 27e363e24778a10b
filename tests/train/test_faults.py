"""Numerical guards, bad input and disk faults of the trainer (docs/reliability.md)."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from configs import grpo as grpo_config
from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import checkpoint, loop
from corpo_jax.train import sft as sft_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import read_jsonl


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
    loop.check_config(_sft_only(tmp_path, max_skipped_steps=-1))


@pytest.mark.slow
def test_checkpoint_from_mesh_4x2_restores_onto_2x4_and_1_device_and_continues_equally(tmp_path):
  cfg = ModelConfig.preset("tiny", num_layers=1)
  opt_cfg = RLConfig(learning_rate=1e-2)
  optimizer = rl_step.make_optimizer(opt_cfg, model.abstract_params(cfg))
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
    return rl_step.abstract_state(cfg, optimizer, mesh)

  mesh = sharding.make_mesh((4, 2, 1, 1))
  state = rl_step.init_state(cfg, optimizer, model.init_params(cfg, jax.random.key(0), mesh), mesh)

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
    loop.setup(config)


def test_disk_full_writing_config_json_keeps_the_old_one(tmp_path, monkeypatch):
  config = _sft_only(tmp_path)
  loop.setup(config)
  old = (tmp_path / "config.json").read_text()
  config.sft.steps = 99
  real_replace = os.replace

  def full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", full)
  with pytest.raises(ValueError, match="No space left on device"):
    loop.setup(config)
  monkeypatch.setattr(os, "replace", real_replace)
  assert (tmp_path / "config.json").read_text() == old
