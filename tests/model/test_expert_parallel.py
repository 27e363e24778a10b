"""moe_dispatch="expert_parallel" through the whole model on 8 fake devices: the forward pass and
the loss gradient, greedy generation (decode passes, dropless) with its expert choices, and one RL
update equal the one-device model (capacity dispatch that cannot drop: E 4, top 2, cf 2), on
each of the four 8-device meshes (data x fsdp x expert x tensor). The layer itself, with and
without drops, is tested in test_moe.py."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from corpo_jax import model, sampling, sharding
from corpo_jax.rl import step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import state as state_lib
from tests.model.test_moe import _assert_close

ONE = model.ModelConfig.preset("tiny")  # capacity dispatch; C = N: drops nothing
EP = dataclasses.replace(ONE, moe_dispatch="expert_parallel")
TOKENS = np.random.default_rng(0).integers(6, ONE.vocab_size, (8, 12)).astype(np.int32)
TOKENS[:, 4] = ONE.think_start_id  # think spans: the thinking head's MoE layers run too
TOKENS[:3, 9] = ONE.think_end_id
MESHES = [(2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 2, 4), (1, 4, 2, 1)]  # data, fsdp, expert, tensor


def _params(cfg):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.value.shape)
                                            + (x.names[-1] == "norm"), jnp.float32),
                      model.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _loss(params, cfg, tokens_BT):
  out = model.run(params, cfg, tokens_BT)
  logits_BTV = model.project(params, cfg, out.hidden)
  logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :-1]), tokens_BT[:, 1:, None],
                                -1)[..., 0]
  return -logp_BT.mean() + 0.01 * out.aux["load_balance_loss"], (logits_BTV, out.experts_LBTA)


_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=1)


@functools.cache
def _one_device_loss_and_grad():
  return _grad(_params(ONE), ONE, TOKENS)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_model_forward_and_gradient_equal_one_device(mesh_shape):
  params = _params(ONE)
  (loss, (logits, experts)), grads = _one_device_loss_and_grad()
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    p = jax.device_put(params, model.param_shardings(EP, mesh))
    t = jax.device_put(TOKENS, sharding.batch_sharding(mesh, TOKENS.shape))
    (loss_s, (logits_s, experts_s)), grads_s = _grad(p, EP, t)
  np.testing.assert_array_equal(experts_s, experts)
  _assert_close((loss_s, logits_s, grads_s), (loss, logits, grads))


_GENERATE = dict(rng=jax.random.key(0), num_samples=2, max_new_tokens=6,
                 strategy=(sampling.Greedy(),))


@functools.cache
def _one_device_rollout():
  prompts = jnp.asarray(TOKENS[:4, :6])
  return sampling.generate(_params(ONE), ONE, prompts, prompts >= 0, **_GENERATE)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_greedy_generation_and_its_experts_equal_one_device(mesh_shape):
  """Decode steps of 8 rows, one or a few tokens per device group, the experts' slots sent over
  the expert axis; prefill alike. The experts chosen at rollout are the ones the training
  forward of the same tokens chooses (router replay reuses them)."""
  params = _params(ONE)
  prompts = jnp.asarray(TOKENS[:4, :6])
  kw = _GENERATE
  one = _one_device_rollout()
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    p = jax.device_put(params, model.param_shardings(EP, mesh))
    rows = sharding.batch_sharding(mesh, prompts.shape)
    ep = sampling.generate(p, EP, jax.device_put(prompts, rows), jax.device_put(prompts >= 0, rows),
                           **kw)
    full = jnp.concatenate([jnp.repeat(prompts, 2, 0), ep.tokens], 1)
    full_mask = jnp.concatenate([jnp.ones((8, 6), bool), ep.mask], 1)
    trained = jax.jit(lambda p, t, m: model.run(p, EP, t, m).experts_LBTA)(p, full, full_mask)
  np.testing.assert_array_equal(ep.tokens, one.tokens)
  np.testing.assert_allclose(ep.logprobs, one.logprobs, atol=1e-5)
  m = np.asarray(full_mask)
  np.testing.assert_array_equal(np.asarray(ep.experts)[:, m], np.asarray(one.experts)[:, m])
  np.testing.assert_array_equal(np.asarray(trained)[:, m], np.asarray(ep.experts)[:, m])


@functools.cache
def _one_device_update():
  batch, rl_cfg, opt = _update_inputs()
  params = _params(ONE)
  state, _ = step.make_update(ONE, rl_cfg, None, opt)(state_lib.init_state(ONE, opt, params),
                                                      batch, params)
  return jax.device_get(state.params)


@functools.cache
def _update_inputs():
  B, G, P, T = 2, 4, 4, 6
  rng = np.random.default_rng(1)
  tokens = rng.integers(6, ONE.vocab_size, (B * G, P + T)).astype(np.int32)
  loss_mask = np.zeros_like(tokens, bool)
  loss_mask[:, P:] = np.arange(T) < rng.integers(1, T + 1, (B * G, 1))
  token_mask = loss_mask.copy()
  token_mask[:, :P] = True
  experts = np.asarray(jax.jit(lambda p, t, m: model.run(p, ONE, t, m).experts_LBTA)(
      _params(ONE), tokens, token_mask))
  batch = step.Batch(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask,
                     rewards=rng.normal(size=(B, G)).astype(np.float32),
                     truncated=np.zeros(B * G, bool), experts=experts)
  rl_cfg = RLConfig(beta=0.05, learning_rate=1e-3, max_completion_len=T, router_replay=True,
                    logprob_chunk=T)
  return batch, rl_cfg, optax.sgd(0.1)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_rl_update_equals_one_device(mesh_shape):
  """Params after one SGD step of the RL update (policy, reference pass, router replay)."""
  batch, rl_cfg, opt = _update_inputs()
  params = _params(ONE)
  mesh = sharding.make_mesh(mesh_shape)
  ref = jax.device_put(params, model.param_shardings(EP, mesh))
  ep, _ = step.make_update(EP, rl_cfg, mesh, opt)(state_lib.init_state(EP, opt, params, mesh),
                                                  batch, ref)
  _assert_close(jax.device_get(ep.params), _one_device_update())


def test_decode_layout_samples_what_the_trainer_layout_samples():
  """The sampler's copy (model.for_decoding) on data 1 x fsdp 2 x expert 2 x tensor 2: the same
  8 devices viewed as 1 x 1 x 2 x 4, experts split over expert and d_ff over tensor, no weight
  sharded over fsdp; greedy rollouts equal the trainer layout's."""
  mesh = sharding.make_mesh((1, 2, 2, 2))
  params = jax.device_put(_params(EP), model.param_shardings(EP, mesh))
  prompts = jnp.asarray(TOKENS[:4, :6])
  kw = dict(rng=jax.random.key(0), num_samples=2, max_new_tokens=6,
            strategy=(sampling.Greedy(),))
  with jax.set_mesh(mesh):
    rows = sharding.batch_sharding(mesh, prompts.shape)
    train = sampling.generate(params, EP, jax.device_put(prompts, rows),
                              jax.device_put(prompts >= 0, rows), **kw)
  copy, cfg, decode_mesh = model.for_decoding(params, EP, mesh)
  assert dict(decode_mesh.shape) == {"data": 1, "fsdp": 1, "expert": 2, "tensor": 4}
  assert decode_mesh.devices.size == 8 and set(decode_mesh.devices.flat) == set(mesh.devices.flat)
  gate = copy["layers"]["moe"]["gate"]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (2, 2, 64, 32)  # [L, E/2, D, F/4]
  with jax.set_mesh(decode_mesh):
    rows = sharding.batch_sharding(decode_mesh, prompts.shape)
    decode = sampling.generate(copy, cfg, jax.device_put(prompts, rows),
                               jax.device_put(prompts >= 0, rows), **kw)
  np.testing.assert_array_equal(decode.tokens, train.tokens)
  np.testing.assert_allclose(decode.logprobs, train.logprobs, atol=1e-5)
  np.testing.assert_array_equal(decode.experts, train.experts)
