"""Sampler tests: cached decoding against the uncached forward pass, strategies, stops, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import model, sampling, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.data.tokenizer import bundled

_TOK = bundled()  # the special ids the tiny preset was made for
EOS_ID, THINK_START_ID, THINK_END_ID = _TOK.eos_id, _TOK.think_start_id, _TOK.think_end_id

TINY = ModelConfig.preset("tiny")
PLAIN = dataclasses.replace(TINY, thinking_layers=0)


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def plain_params():
  return model.init_params(PLAIN, jax.random.key(0))


def _prompts(lengths, width, seed=1, last=None):
  """Left-padded random prompts (ids >= 6, so no special tokens) with the given lengths."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), width), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, width - n:] = rng.integers(6, TINY.vocab_size, n)
    if last is not None:
      tokens[b, -1] = last
  return jnp.asarray(tokens), jnp.asarray(tokens != 0)


_forward = jax.jit(model.forward, static_argnums=1)


def _reference(params, cfg, prompts, mask, steps, force=None):
  """Greedy decoding by the full uncached forward pass; `force[t]` overrides the token at t.

  One fixed-width (right-padded) sequence, so the forward compiles once. Returns tokens
  [B, steps] and their log-probs.
  """
  B, P = prompts.shape
  tokens = np.concatenate([np.asarray(prompts), np.zeros((B, steps), np.int32)], 1)
  m = np.concatenate([np.asarray(mask), np.zeros((B, steps), bool)], 1)
  out, logps = [], []
  for t in range(steps):
    logits = _forward(params, cfg, jnp.asarray(tokens), jnp.asarray(m))[:, P - 1 + t]
    tok = np.asarray(logits.argmax(-1)) if force is None or t not in force else np.full(B, force[t])
    logp = np.asarray(jax.nn.log_softmax(logits))
    out.append(tok)
    logps.append(np.take_along_axis(logp, tok[:, None], 1)[:, 0])
    tokens[:, P + t], m[:, P + t] = tok, True
  return np.stack(out, 1), np.stack(logps, 1)


@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_equals_uncached_argmax(params, plain_params, thinking):
  cfg, p = (TINY, params) if thinking else (PLAIN, plain_params)
  # With the thinking head the prompts end inside a think span: its logits must be used.
  prompts, mask = _prompts([3, 7, 12, 1], 12, last=THINK_START_ID if thinking else None)
  out = sampling.generate(p, cfg, prompts, mask, rng=jax.random.key(0), num_samples=2,
                          max_new_tokens=6, strategy=sampling.Greedy())
  ref_tokens, ref_logp = _reference(p, cfg, prompts, mask, 6)
  np.testing.assert_array_equal(out.tokens, np.repeat(ref_tokens, 2, 0))
  np.testing.assert_allclose(out.logprobs, np.repeat(ref_logp, 2, 0), atol=1e-5)
  assert out.mask.all() and out.truncated.all() and not out.forced.any()
  np.testing.assert_array_equal(out.lengths, 6)
  if thinking:  # the think span changes the result: the base head alone gives other tokens
    base_logits = _forward(params, dataclasses.replace(TINY, think_start_id=-1), prompts, mask)
    assert not np.array_equal(np.asarray(base_logits[:, -1].argmax(-1)), ref_tokens[:, 0])


def test_logprobs_match_forward(params):
  prompts, mask = _prompts([5, 9], 9)
  for strategy in [(sampling.Temperature(1.0),),
                   (sampling.Temperature(0.7), sampling.TopK(20), sampling.TopP(0.6))]:
    out = sampling.generate(params, TINY, prompts, mask, rng=jax.random.key(3), num_samples=3,
                            max_new_tokens=4, strategy=strategy)
    full = np.concatenate([np.repeat(np.asarray(prompts), 3, 0), np.asarray(out.tokens)], 1)
    full_mask = np.concatenate([np.repeat(np.asarray(mask), 3, 0), np.asarray(out.mask)], 1)
    logits = np.asarray(_forward(params, TINY, jnp.asarray(full), jnp.asarray(full_mask)),
                        np.float64)[:, 8:-1]  # logits producing the 4 completion tokens
    for s in strategy:
      if isinstance(s, sampling.Temperature):
        logits = logits / s.temperature
      elif isinstance(s, sampling.TopK):
        kth = np.sort(logits, -1)[..., -s.k][..., None]
        logits = np.where(logits >= kth, logits, -np.inf)
      else:  # top-p by hand: smallest prefix of the sorted distribution with mass >= p
        order = np.argsort(-logits, -1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < s.p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        assert 1 <= keep.sum(-1).min() and (keep.sum(-1) < np.isfinite(logits).sum(-1)).all()
        logits = np.where(keep, logits, -np.inf)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], -1)[..., 0]
    assert np.isfinite(expected).all(), strategy
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-5, err_msg=str(strategy))


def test_sampling_frequencies():
  """First-token frequencies of 4096 samples against the model's top-6 distribution (vocab 8).

  Seeded, so deterministic; the bound is the chi-square 1e-6 upper quantile (< 35 for <= 7
  degrees of freedom), far above the typical value (~ the degrees of freedom)."""
  strategy = (sampling.Temperature(1.5), sampling.TopK(6))
  cfg = dataclasses.replace(PLAIN, vocab_size=8)
  p = model.init_params(cfg, jax.random.key(5))
  prompts = jnp.asarray([[6, 7, 6]], jnp.int32)
  out = sampling.generate(p, cfg, prompts, jnp.ones_like(prompts, bool), rng=jax.random.key(7),
                          num_samples=4096, max_new_tokens=1, strategy=strategy)
  logits = np.asarray(_forward(p, cfg, prompts)[0, -1], np.float64)
  for s in strategy:
    logits = logits / s.temperature if isinstance(s, sampling.Temperature) else np.where(
        logits >= np.sort(logits)[-s.k], logits, -np.inf)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=8)
  assert counts[probs == 0].sum() == 0
  expected = 4096 * probs[probs > 0]
  assert expected.min() > 20  # the test needs every kept token to be reasonably likely
  chi2 = np.sum((counts[probs > 0] - expected) ** 2 / expected)
  assert chi2 < 35, (counts, expected)


def test_left_padding_does_not_change_results(params):
  short, short_mask = _prompts([4, 2], 4, seed=2)
  wide, wide_mask = _prompts([4, 2], 20, seed=2)  # other bucket (32 instead of 16)
  np.testing.assert_array_equal(short[:, -2:], wide[:, -2:])
  kw = dict(rng=jax.random.key(1), num_samples=2, max_new_tokens=5)
  a = sampling.generate(params, TINY, short, short_mask, **kw)
  b = sampling.generate(params, TINY, wide, wide_mask, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  np.testing.assert_array_equal(a.experts[:, :, -5:], b.experts[:, :, -5:])
  assert a.experts.shape == (2, 4, 4 + 5, 2) and b.experts.shape == (2, 4, 20 + 5, 2)


def test_eos_stops_row_and_truncation_is_flagged(plain_params):
  prompts, mask = _prompts([5, 8, 3], 8, seed=4)
  kw = dict(rng=jax.random.key(0), num_samples=1, max_new_tokens=8, strategy=sampling.Greedy())
  free = sampling.generate(plain_params, PLAIN, prompts, mask, **kw)
  eos = int(free.tokens[0, 2])  # row 0 generates this token first at step 2 or earlier
  first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
  out = sampling.generate(plain_params, PLAIN, prompts, mask, eos_id=eos, **kw)
  for b in range(3):
    hits = np.flatnonzero(np.asarray(free.tokens[b]) == eos)
    n = hits[0] + 1 if len(hits) else 8
    assert int(out.lengths[b]) == n and bool(out.truncated[b]) == (len(hits) == 0)
    np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
    np.testing.assert_array_equal(out.tokens[b, n:], PLAIN.pad_id)
    np.testing.assert_array_equal(out.mask[b], np.arange(8) < n)
    np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
  assert int(out.lengths[0]) == first + 1 <= 3 and not out.truncated[0]


def test_thinking_budget_forces_think_end(params):
  prompts, mask = _prompts([4, 6], 6, seed=3, last=THINK_START_ID)
  out = sampling.generate(params, TINY, prompts, mask, rng=jax.random.key(0), num_samples=1,
                          max_new_tokens=7, strategy=sampling.Greedy(), max_thinking_tokens=3)
  ref_tokens, ref_logp = _reference(params, TINY, prompts, mask, 7, force={3: THINK_END_ID})
  assert (ref_tokens[:, :3] != THINK_END_ID).all()  # the end was forced, not chosen
  np.testing.assert_array_equal(out.tokens, ref_tokens)  # after </think>: the base head again
  np.testing.assert_allclose(out.logprobs, ref_logp, atol=1e-5)
  # Only the forced end is marked: the RL update leaves it out of the loss.
  np.testing.assert_array_equal(out.forced, np.broadcast_to(np.arange(7) == 3, (2, 7)))


def test_experts_match_full_forward(params):
  prompts, mask = _prompts([6, 3], 6, seed=5)
  out = sampling.generate(params, TINY, prompts, mask, rng=jax.random.key(2), num_samples=2,
                          max_new_tokens=5, eos_id=EOS_ID)
  full = jnp.concatenate([jnp.repeat(prompts, 2, 0), out.tokens], 1)
  full_mask = jnp.concatenate([jnp.repeat(mask, 2, 0), out.mask], 1)
  ref = jax.jit(lambda p, t, m: model.run(p, TINY, t, m).experts_LBTA)(params, full, full_mask)
  assert out.experts.shape == ref.shape == (TINY.num_layers, 4, 11, TINY.top_k)
  m = np.asarray(full_mask)
  np.testing.assert_array_equal(np.asarray(out.experts)[:, m], np.asarray(ref)[:, m])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 2, 1)])
def test_sharded_equals_single_device(params, mesh_shape):
  prompts, mask = _prompts([3, 7, 5, 1], 8, seed=6)
  kw = dict(rng=jax.random.key(4), num_samples=2, max_new_tokens=5, eos_id=EOS_ID,
            max_thinking_tokens=2)
  single = sampling.generate(params, TINY, prompts, mask, **kw)
  mesh = sharding.make_mesh(mesh_shape)
  sharded_params = jax.device_put(params, model.param_shardings(TINY, mesh))
  with jax.set_mesh(mesh):
    batch = sharding.batch_sharding(mesh, prompts.shape)
    out = sampling.generate(sharded_params, TINY, jax.device_put(prompts, batch),
                            jax.device_put(mask, batch), **kw)
  assert len(out.tokens.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(out)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_compiles_once_per_bucket(plain_params):
  kw = dict(rng=jax.random.key(0), num_samples=2, strategy=sampling.TopK(4))
  prompts, mask = _prompts([2, 5], 5)
  before = sampling._jitted(jax.default_backend())._cache_size()
  a = sampling.generate(plain_params, PLAIN, prompts, mask, max_new_tokens=9, **kw)
  prompts, mask = _prompts([2, 11], 11)
  b = sampling.generate(plain_params, PLAIN, prompts, mask, max_new_tokens=12, **kw)
  assert a.tokens.shape == (4, 9) and b.tokens.shape == (4, 12) and b.experts.shape[2] == 23
  assert sampling._jitted(jax.default_backend())._cache_size() == before + 1


def test_bucket_and_bad_arguments(plain_params):
  assert [sampling.bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
  prompts, mask = _prompts([2], 2)
  with pytest.raises(ValueError, match="Greedy"):
    sampling.generate(plain_params, PLAIN, prompts, mask, rng=jax.random.key(0), num_samples=1,
                      max_new_tokens=2, strategy=(sampling.Greedy(), sampling.TopK(2)))
  with pytest.raises(ValueError, match="max_seq_len"):
    sampling.generate(plain_params, PLAIN, prompts, mask, rng=jax.random.key(0), num_samples=1,
                      max_new_tokens=300)
  with pytest.raises(ValueError, match="Temperature"):
    sampling.Temperature(0.0)


def test_strategy_of_config_fields():
  assert sampling.strategy(0.0, top_k=5, top_p=0.5) == (sampling.Greedy(),)
  assert sampling.strategy(0.8) == (sampling.Temperature(0.8),)
  assert sampling.strategy(0.8, top_k=5, top_p=0.9) == (
      sampling.Temperature(0.8), sampling.TopK(5), sampling.TopP(0.9))
