"""Every RLConfig field does something: changed from its default (with the fields it depends on
switched on), it changes the compiled RL update's program or its run-time inputs, or, for the
trainer's own fields, a test of the trainer names it. A new field without an entry here fails."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import model
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import optim
from corpo_jax.train import state as state_lib

CFG = model.ModelConfig.preset("tiny", num_layers=1, thinking_layers=0)
B, G, P, T = 2, 2, 3, 4

# Fields on every configuration below: a reference pass, ratios away from 1 (2 iterations), a
# forced token and truncated rows in the batch, so that every option has something to act on.
BASE = dict(beta=0.05, num_iterations=2, max_completion_len=T, overlong_buffer=2)

# field -> (the other fields it needs, a value other than the default)
CHANGES = {
    "advantage": ({"scale": "none"}, "rloo"),
    "scale": ({}, "batch"),
    "eps": ({}, 0.5),
    "eps_low": ({}, 0.1),
    "eps_high": ({}, 0.3),
    "beta": ({}, 0.2),
    "reference_dtype": ({}, "bfloat16"),
    "kl_estimator": ({}, "k3"),
    "aggregation": ({}, "token_mean"),
    "importance_level": ({}, "sequence"),
    "mask_truncated": ({}, True),
    "loss_on_forced": ({}, True),
    "overlong_penalty": ({}, True),
    "overlong_buffer": ({"overlong_penalty": True}, 3),
    "overlong_factor": ({"overlong_penalty": True}, 0.5),
    "max_completion_len": ({"aggregation": "seq_mean_token_sum_norm"}, 8),
    "temperature": ({}, 0.7),
    "router_replay": ({}, True),
    "num_iterations": ({}, 3),
    "num_micro_batches": ({}, 2),
    "logprob_chunk": ({}, 2),
    "share_prompt": ({}, False),
    "b1": ({}, 0.5),
    "b2": ({}, 0.5),
    "grad_clip_norm": ({}, 0.5),
    "freeze": ({}, ("layers",)),
}
# Run-time inputs of the one compiled program (optim.RUNTIME_FIELDS): they change its arguments.
RUNTIME = {"tau": 0.5, "learning_rate": 1e-3, "warmup_steps": 3, "decay_steps": 10,
           "weight_decay": 0.1}
# Read by the trainer, not the update; the test that shows each one working.
TRAINER = {"dynamic_sampling": "tests/rl/test_rollout.py::test_dynamic_sampling_trains_on_mixed_groups_and_resumes_exactly",
           "dynamic_sampling_max_batches": "tests/rl/test_rollout.py::test_collect_fills_with_uninformative_groups_when_the_batches_run_out"}


@functools.cache
def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(6, CFG.vocab_size, (B * G, P + T)).astype(np.int32)
  token_mask = np.ones_like(tokens, bool)
  loss_mask = np.zeros_like(tokens, bool)
  loss_mask[:, P:] = True
  forced = np.zeros_like(tokens, bool)
  forced[0, P + 1] = True
  params = model.init_params(CFG, jax.random.key(0))
  experts = np.asarray(jax.jit(lambda p, t: model.run(p, CFG, t).experts_LBTA)(params, tokens))
  batch = rl_step.Batch(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask,
                        rewards=rng.normal(size=(B, G)).astype(np.float32),
                        truncated=np.arange(B * G) % 2 == 0, experts=experts, forced=forced,
                        prompt_len=P)
  return params, batch


@functools.cache
def _program(rl_cfg: RLConfig) -> str:
  """The update's lowered program text (lowering traces it; nothing is compiled)."""
  params, batch = _inputs()
  optimizer = optim.program_optimizer(CFG, rl_cfg)
  update = rl_step.make_update(CFG, rl_cfg, None, optimizer)
  state = jax.eval_shape(lambda p: state_lib.init_state(CFG, optimizer, p), params)
  ref = params if rl_cfg.reference_dtype == "param" else jax.tree.map(
      lambda x: x.astype(jnp.bfloat16), params)
  return update.lower(state, batch, ref).as_text()


def test_every_field_is_covered_here():
  names = {f.name for f in dataclasses.fields(RLConfig)}
  assert names == set(CHANGES) | set(RUNTIME) | set(TRAINER), (
      names ^ (set(CHANGES) | set(RUNTIME) | set(TRAINER)))
  assert set(RUNTIME) == set(optim.RUNTIME_FIELDS)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_field_changes_the_compiled_update(field):
  needs, value = CHANGES[field]
  before = RLConfig(**{**BASE, **needs})
  after = dataclasses.replace(before, **{field: value})
  assert getattr(before, field) != value
  assert _program(after) != _program(before), field


def test_runtime_fields_change_the_update_inputs():
  for field, value in RUNTIME.items():
    before, after = RLConfig(**BASE), RLConfig(**{**BASE, field: value})
    assert optim.program_config(before) == optim.program_config(after)  # the same program
    assert optim.hyperparams(after)[field] == np.float32(value) != optim.hyperparams(before)[field]


def test_trainer_fields_name_a_test_that_exists():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for field, test in TRAINER.items():
    path, name = test.split("::")
    with open(os.path.join(root, path)) as f:
      assert f"def {name}(" in f.read(), (field, test)
