"""The decoder and thinking head: KV cache == full pass, causality, jit, remat, think-span routing."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import model
from corpo_jax.data.tokenizer import bundled

_TOK = bundled()  # the special ids the tiny preset was made for
PAD_ID, THINK_START_ID, THINK_END_ID = _TOK.pad_id, _TOK.think_start_id, _TOK.think_end_id

S, E = THINK_START_ID, THINK_END_ID
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _cfg(**kw):
  return model.ModelConfig.preset("tiny", **kw)


def random_params(cfg, seed=0):
  """Random parameters of the model's shapes, built in numpy (no init compile: keeps tests fast)."""
  rng = np.random.default_rng(seed)

  def one(leaf):
    shape, names = leaf.value.shape, leaf.names
    if names[-1] == "norm":
      return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
    fan_in = 1 if names[0] == "vocab" else shape[-2] if names[-2] == "mlp" else cfg.d_model
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree.map(one, model.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.cache
def _params(**kw):
  return random_params(_cfg(**kw))


_forward = jax.jit(model.forward, static_argnums=1)
_run = jax.jit(model.run, static_argnums=1)

# Rows of different lengths, left padded; think spans open and close in the prefill (row 0), open in
# the prefill and close during decode (row 1), open during decode (row 2), none (row 3).
TOKENS = np.array([
    [PAD_ID, 9, S, 11, 12, E, 13, 14, S, 15, 16, 17],
    [PAD_ID, PAD_ID, PAD_ID, 20, 21, S, 22, 23, 24, E, 25, 26],
    [PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, 30, 31, 32, S, 33, E, 34],
    [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51],
    [20, 21, S, 22, 23, 24, E, 25, 26, PAD_ID, PAD_ID, PAD_ID],  # row 1, right padded
], np.int32)
PREFILL = 7  # tokens before the first decode step


def _cached_logits(params, cfg, tokens, prefill):
  """Logits of a prefill of `prefill` tokens then one decode step per token; also the cache and
  the think mask of the first decode step."""
  out = _run(params, cfg, tokens[:, :prefill], cache=model.init_cache(cfg, tokens.shape[0], 16))
  logits, cache = [model.project(params, cfg, out.hidden)], out.cache
  first_step_think_mask = None
  for t in range(prefill, tokens.shape[1]):
    out = _run(params, cfg, tokens[:, t:t + 1], cache=cache)
    logits.append(model.project(params, cfg, out.hidden))
    cache = out.cache
    if first_step_think_mask is None:
      first_step_think_mask = out.hidden.think_mask_BT[:, 0]
  return jnp.concatenate(logits, axis=1), cache, first_step_think_mask


# ------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("thinking_layers", [1, 0])
def test_prefill_then_decode_equals_full_pass(thinking_layers):
  cfg, params = _cfg(thinking_layers=thinking_layers), _params(thinking_layers=thinking_layers)
  real = TOKENS != PAD_ID
  full = _forward(params, cfg, jnp.asarray(TOKENS))
  cached, cache, first_step_think_mask = _cached_logits(params, cfg, jnp.asarray(TOKENS), PREFILL)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], **TOL)
  np.testing.assert_array_equal(cache.next_pos_B, real.sum(1))
  np.testing.assert_array_equal(cache.valid_BS, np.pad(real, ((0, 0), (0, 4))))
  assert int(cache.end) == TOKENS.shape[1]
  think = thinking_layers > 0
  # Row 1 opened a span in the prefill: its first decode step takes the thinking head.
  np.testing.assert_array_equal(first_step_think_mask, [False, think, False, False, False])
  # Row 0 reopened a span with its last <think> but one token; the others are closed or plain.
  np.testing.assert_array_equal(cache.think_open_B, [think, False, False, False, False])


def test_left_or_right_padding_give_the_same_logits():
  logits = _forward(_params(), _cfg(), jnp.asarray(TOKENS))
  np.testing.assert_allclose(logits[1, 3:], logits[4, :9], **TOL)


def test_router_replay_of_own_choices_changes_nothing():
  cfg, params = _cfg(), _params()
  tokens = jnp.asarray(TOKENS)
  logits = lambda out: model.project(params, cfg, out.hidden)
  out = _run(params, cfg, tokens)
  assert out.experts_LBTA.shape == (cfg.num_layers, 5, 12, cfg.top_k)
  replay = _run(params, cfg, tokens, experts_LBTA=out.experts_LBTA)
  np.testing.assert_allclose(logits(replay), logits(out), **TOL)
  # Replaying a different choice changes the logits.
  other = _run(params, cfg, tokens, experts_LBTA=(out.experts_LBTA + 1) % cfg.num_experts)
  assert np.abs(logits(other) - logits(out)).max() > 1e-3


# ------------------------------------------------------------------------ causality, jit, remat


def test_causality_gradient_wrt_future_inputs_is_exactly_zero():
  """d logits[t] / d embedding of the token at s > t is exactly 0, also at padding positions.

  Every position holds a distinct token id, so the gradient w.r.t. row tokens[s] of the embedding
  table is the gradient w.r.t. the input embedding at position s. (Capacity dispatch, the one
  path that mixes tokens; `sort` is checked token by token in test_moe.py.)
  """
  cfg, params = _cfg(), _params()
  tokens = jnp.asarray([[PAD_ID, 7, S, 8, 9, E, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19]])
  ids = np.asarray(tokens)

  @jax.jit
  def grad_row_norms(embed, t):
    def out_t(embed):
      logits = model.forward({**params, "embed": embed}, cfg, tokens)
      return jnp.sum(logits[:, t] * jnp.linspace(-1, 1, cfg.vocab_size))
    return jnp.abs(jax.grad(out_t)(embed)).sum(-1)  # [V]

  for t in range(tokens.shape[1]):
    norms = np.asarray(grad_row_norms(params["embed"], t))
    for b in range(2):
      assert np.all(norms[ids[b, t + 1:]] == 0.0), (t, b)
      # Real tokens up to t matter; padding matters only to itself.
      seen = [s for s in range(t + 1) if ids[b, s] != PAD_ID or s == t]
      unseen = [s for s in range(t + 1) if ids[b, s] == PAD_ID and s != t]
      assert np.all(norms[ids[b, seen]] > 0.0), (t, b)
      assert np.all(norms[ids[b, unseen]] == 0.0), (t, b)


def test_jit_equals_no_jit():
  cfg, params = _cfg(thinking_layers=0), _params(thinking_layers=0)
  tokens = jnp.asarray(TOKENS)
  eager = model.run(params, cfg, tokens)
  jitted = _run(params, cfg, tokens)
  np.testing.assert_allclose(model.project(params, cfg, jitted.hidden),
                             model.project(params, cfg, eager.hidden), **TOL)
  chex.assert_trees_all_close(jitted.aux, eager.aux, **TOL)


def _loss(params, cfg, tokens):
  """Mean next-token log-prob of the real tokens plus the weighted aux losses."""
  out = model.run(params, cfg, tokens)
  logp_BTV = jax.nn.log_softmax(model.project(params, cfg, out.hidden)[:, :-1])
  logp_BT = jnp.take_along_axis(logp_BTV, tokens[:, 1:, None], -1)[..., 0]
  mask_BT = (tokens[:, 1:] != PAD_ID) & (tokens[:, :-1] != PAD_ID)
  nll = -jnp.sum(logp_BT * mask_BT) / mask_BT.sum()
  return (nll + cfg.load_balance_weight * out.aux["load_balance_loss"]
          + cfg.z_loss_weight * out.aux["z_loss"])


_loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.mark.parametrize("remat,dispatch", [("full", "capacity"), ("dots", "capacity"),
                                            ("experts", "expert_parallel"),
                                            ("dots_and_experts", "expert_parallel")])
def test_remat_equals_no_remat(remat, dispatch):
  """Every policy; the named ones on the dispatch whose expert matmuls carry the names."""
  params, tokens = _params(), jnp.asarray(TOKENS)
  loss, grads = _loss_and_grad(params, _cfg(moe_dispatch=dispatch), tokens)
  loss_r, grads_r = _loss_and_grad(params, _cfg(remat=remat, moe_dispatch=dispatch), tokens)
  np.testing.assert_allclose(loss_r, loss, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_r, grads)
  # The gradient reaches every parameter but the step classifier (not in this loss).
  grads["thinking"].pop("step_head")
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------- thinking head


def test_think_mask_on_hand_built_sequence():
  cfg = _cfg()
  tokens = jnp.asarray([[PAD_ID, 7, S, 8, 9, E, 10, S, 11],
                        [PAD_ID, PAD_ID, 7, 8, E, 9, S, E, 10]])
  mask = model.think_mask(tokens, tokens != PAD_ID, cfg)
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 0, 0, 1, 1],
                                       [0, 0, 0, 0, 0, 0, 1, 0, 0]])
  # A span carried in open (decode continuation) stays open up to its </think>.
  mask = model.think_mask(tokens, tokens != PAD_ID, cfg, open_at_start_B=jnp.asarray([False, True]))
  np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 0, 0, 1, 0, 0])
  # Without a thinking head, or without think tokens in the vocabulary, there are no spans.
  assert not model.think_mask(tokens, tokens != PAD_ID, _cfg(thinking_layers=0)).any()
  assert not model.think_mask(tokens, tokens != PAD_ID, _cfg(think_start_id=-1)).any()


@pytest.mark.parametrize("shared", [True, False])
def test_logits_take_the_thinking_head_inside_think_spans(shared):
  cfg, params = _cfg(thinking_shared_unembed=shared), _params(thinking_shared_unembed=shared)
  tokens = jnp.asarray(TOKENS)
  out = _run(params, cfg, tokens)
  expected_mask = np.asarray(out.hidden.think_mask_BT)
  np.testing.assert_array_equal(expected_mask[0], [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(expected_mask[3], 0)
  assert out.step_logits_BTC.shape == (5, 12, cfg.num_step_classes)
  assert out.step_logits_BTC.dtype == jnp.float32
  logits = _forward(params, cfg, tokens)
  # By hand: base hidden @ base unembedding, thinking hidden @ (shared or own) unembedding.
  base = out.hidden.base_BTD @ params["lm_head"]
  think = out.hidden.think_BTD @ (params["lm_head"] if shared else params["thinking"]["lm_head"])
  np.testing.assert_allclose(logits, np.where(expected_mask[..., None], think, base), **TOL)
  assert np.abs(think - base).max(-1).min() > 1e-3  # the two heads really differ
  # `project` with hand-made masks selects one head everywhere.
  all_think = model.project(params, cfg, out.hidden.replace(think_mask_BT=jnp.ones((5, 12), bool)))
  all_base = model.project(params, cfg, out.hidden.replace(think_mask_BT=jnp.zeros((5, 12), bool)))
  np.testing.assert_allclose(all_think, think, **TOL)
  np.testing.assert_allclose(all_base, base, **TOL)
  # `project` on a time slice equals the slice of the full projection.
  sliced = jax.tree.map(lambda x: x[:, 3:6], out.hidden)
  np.testing.assert_allclose(model.project(params, cfg, sliced), logits[:, 3:6], **TOL)


def test_zero_thinking_layers_is_the_base_model():
  cfg0, cfg1 = _cfg(thinking_layers=0), _cfg()
  params1 = _params()
  params0 = {k: v for k, v in params1.items() if k != "thinking"}
  assert jax.tree.structure(params0) == jax.tree.structure(_params(thinking_layers=0))
  tokens = jnp.asarray(TOKENS)
  base = _forward(params0, cfg0, tokens)
  with_head = _forward(params1, cfg1, tokens)
  outside = ~np.asarray(model.think_mask(tokens, tokens != PAD_ID, cfg1))
  assert outside.sum() < outside.size  # the sequence has think spans
  np.testing.assert_allclose(np.asarray(with_head)[outside], np.asarray(base)[outside],
                             rtol=1e-6, atol=1e-6)
  # With the span mask forced off, the thinking model's logits are the base model's everywhere.
  off = _run(params1, cfg1, tokens, think_mask_BT=jnp.zeros(tokens.shape, bool))
  np.testing.assert_allclose(model.project(params1, cfg1, off.hidden), base, rtol=1e-6, atol=1e-6)
  out0 = jax.eval_shape(lambda p: model.run(p, cfg0, tokens), params0)
  assert out0.hidden.think_BTD is None and out0.step_logits_BTC is None
  assert out0.aux["expert_load"].shape == (cfg0.num_layers, cfg0.num_experts)


def test_remat_experts_keeps_the_named_expert_matmuls():
  """remat="experts" saves the expert matmuls by name: the compiled gradient holds more live
  temporaries than "full" (which recomputes them) and fewer than no remat."""
  def temps(remat):
    cfg = _cfg(remat=remat, moe_dispatch="expert_parallel")
    grad = jax.jit(jax.grad(lambda p, t: model.forward(p, cfg, t).mean()))
    return grad.lower(random_params(cfg), jnp.asarray(TOKENS)).compile().memory_analysis(
        ).temp_size_in_bytes
  full, experts, none = temps("full"), temps("experts"), temps("none")
  assert full < experts < none
