"""Learning sanity: the update raises the reward of a toy task (reward = share of TARGET tokens)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import model
from corpo_jax.rl import step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import optim
from corpo_jax.train import state as state_lib

CFG = model.ModelConfig.preset("tiny", vocab_size=16, d_model=32, d_ff=32, num_layers=1,
                               num_heads=4, num_kv_heads=2, thinking_layers=0)
TARGET = 7
B, G, P, TC = 4, 4, 2, 6


@jax.jit
def _sample(params, prompts_BP, rng):
  """Completions [B * G, TC] drawn at temperature 1 with full (uncached) forward passes."""
  tokens = jnp.concatenate([jnp.repeat(prompts_BP, G, axis=0), jnp.zeros((B * G, TC), jnp.int32)], 1)
  mask = jnp.ones_like(tokens, bool)

  def body(t, tokens):
    logits_BV = jax.lax.dynamic_index_in_dim(model.forward(params, CFG, tokens, mask), P + t - 1,
                                             axis=1, keepdims=False)
    next_B = jax.random.categorical(jax.random.fold_in(rng, t), logits_BV).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(tokens, next_B[:, None], (0, P + t))

  return jax.lax.fori_loop(0, TC, body, tokens)


@functools.cache
def _init_params():
  return model.init_params(CFG, jax.random.key(0))  # init_state copies: safe to share


def _train(advantage, scale, steps=50):
  rl_cfg = RLConfig(advantage=advantage, scale=scale, tau=0.5, learning_rate=1e-2,
                    max_completion_len=TC)
  params = _init_params()
  opt = optim.make_optimizer(rl_cfg, params)
  state = state_lib.init_state(CFG, opt, params)
  update = step.make_update(CFG, rl_cfg, None, opt)
  rng = jax.random.key(1)
  loss_mask = np.zeros((B * G, P + TC), bool)
  loss_mask[:, P:] = True
  mean_rewards = []
  for i in range(steps):
    prompts = jax.random.randint(jax.random.fold_in(rng, 2 * i), (B, P), 6, CFG.vocab_size)
    tokens = np.asarray(_sample(state.params, prompts, jax.random.fold_in(rng, 2 * i + 1)))
    rewards = (tokens[:, P:] == TARGET).mean(1).reshape(B, G).astype(np.float32)
    mean_rewards.append(rewards.mean())
    batch = step.Batch(tokens=tokens, token_mask=np.ones_like(loss_mask), loss_mask=loss_mask,
                       rewards=rewards, truncated=np.ones(B * G, bool))
    state, metrics = update(state, batch)
  return np.array(mean_rewards)


@pytest.mark.slow
@pytest.mark.parametrize("advantage, scale", [("grpo", "group"), ("corpo", "none")])
def test_fifty_updates_raise_the_reward(advantage, scale):
  r = _train(advantage, scale)
  assert r[:5].mean() < 0.15  # about 1 / 16 at initialisation
  assert r[-10:].mean() > r[:5].mean() + 0.3, r
