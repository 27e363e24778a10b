"""Losses: hand-computed values per aggregation and KL estimator; the surrogate's gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax.rl import losses

# Two completions, three steps; log old = 0 so r = exp(logp). Row 0 has two loss tokens.
R_BT = np.array([[1.5, 0.9, 1.0], [0.5, 1.1, 1.3]], np.float32)
MASK_BT = np.array([[True, True, False], [True, True, True]])
ADV_B = np.array([1.0, -2.0], np.float32)
# -min(r A, clip(r, 0.8, 1.2) A) per token:
# row 0 (A = 1):  -min(1.5, 1.2) = -1.2 (clipped), -min(0.9, 0.9) = -0.9
# row 1 (A = -2): -min(-1.0, -1.6) = 1.6 (clipped), 2.2, -min(-2.6, -2.4) = 2.6
LOSS_BT = np.array([[-1.2, -0.9, 0.0], [1.6, 2.2, 2.6]], np.float32)


def _aggregate(x_BT, mask_BT, mode, max_len):
  """(sum, denominator): the update's mean is sum / max(denominator, 1)."""
  return (losses.aggregate_sum(x_BT, mask_BT, mode, max_len),
          losses.aggregate_denominator(mask_BT, mode))


def _token_loss(level="token"):
  log_r = losses.log_ratio(jnp.log(R_BT), jnp.zeros_like(R_BT), MASK_BT, level)
  return losses.clipped_surrogate(log_r, ADV_B, 0.2, 0.2)


def test_token_level_clipped_surrogate():
  loss_BT, clipped_BT = _token_loss()
  np.testing.assert_allclose(np.where(MASK_BT, loss_BT, 0), LOSS_BT, rtol=1e-6)
  np.testing.assert_array_equal(clipped_BT & MASK_BT, [[True, False, False], [True, False, False]])


def test_clip_higher_is_asymmetric():
  log_r = jnp.log(jnp.array([[1.25, 0.75]]))
  loss_BT, _ = losses.clipped_surrogate(log_r, jnp.array([1.0]), 0.2, 0.28)
  np.testing.assert_allclose(loss_BT, [[-1.25, -0.75]], rtol=1e-6)  # 1.25 < 1.28: not clipped
  loss_BT, _ = losses.clipped_surrogate(log_r, jnp.array([-1.0]), 0.2, 0.28)
  np.testing.assert_allclose(loss_BT, [[1.25, 0.8]], rtol=1e-6)  # 0.75 < 0.8: clipped


@pytest.mark.parametrize("mode, total, denom", [
    ("token_mean", -2.1 + 6.4, 5.0),
    ("seq_mean_token_mean", -2.1 / 2 + 6.4 / 3, 2.0),
    ("seq_mean_token_sum_norm", (-2.1 + 6.4) / 4, 2.0),
])
def test_aggregation(mode, total, denom):
  loss_BT, _ = _token_loss()
  s, d = _aggregate(loss_BT, MASK_BT, mode, max_len=4)
  assert float(s) == pytest.approx(total, rel=1e-6)
  assert float(d) == denom


def test_aggregation_splits_exactly_over_micro_batches():
  x_BT = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  mask_BT = jnp.asarray(np.random.default_rng(1).random((4, 5)) < 0.6).at[3].set(False)
  for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
    s, d = _aggregate(x_BT, mask_BT, mode, 5)
    parts = sum(losses.aggregate_sum(x_BT[i:i + 2], mask_BT[i:i + 2], mode, 5) for i in (0, 2))
    np.testing.assert_allclose(parts / d, s / d, rtol=1e-6)
  # A row without loss tokens has no mean to count; Dr. GRPO's normaliser counts every row.
  assert float(losses.aggregate_denominator(mask_BT, "seq_mean_token_mean")) == float(
      mask_BT[:3].any(-1).sum())
  assert float(losses.aggregate_denominator(mask_BT, "seq_mean_token_sum_norm")) == 4.0


def test_sequence_level_ratio_gspo():
  loss_BT, _ = _token_loss("sequence")
  s0 = math.sqrt(1.5 * 0.9)  # exp(mean log r) over the row's two tokens
  s1 = (0.5 * 1.1 * 1.3) ** (1 / 3)  # 0.894: above 0.8, not clipped
  np.testing.assert_allclose(loss_BT[0, :2], [-min(s0, 1.2)] * 2, rtol=1e-6)
  np.testing.assert_allclose(loss_BT[1], [2 * s1] * 3, rtol=1e-6)
  s, d = _aggregate(loss_BT, MASK_BT, "seq_mean_token_mean", 3)
  assert float(s / d) == pytest.approx((-min(s0, 1.2) + 2 * s1) / 2, rel=1e-6)


@pytest.mark.parametrize("estimator, value", [
    ("k1", math.log(2)),  # logp - ref
    ("k2", 0.5 * math.log(2) ** 2),
    ("k3", 0.5 + math.log(2) - 1),  # exp(ref - logp) - (ref - logp) - 1
    ("k3_ratio", 1.25 * (0.5 + math.log(2) - 1)),  # r = 0.5 / 0.4 times k3
])
def test_kl_estimators(estimator, value):
  out = losses.kl(jnp.log(jnp.array([[0.5]])), jnp.log(jnp.array([[0.25]])),
                  jnp.log(jnp.array([[0.4]])), estimator)
  assert float(out[0, 0]) == pytest.approx(value, rel=1e-6)


# One position over a vocabulary of 6: the policy's logits, the reference's, and a sampling
# policy pi_old that differs from the policy (a later iteration on the same rollout).
THETA_V = jnp.array([0.3, -1.2, 0.8, 0.0, 1.5, -0.4])
REF_V = jnp.array([1.0, 0.2, -0.5, 0.4, 0.1, -1.0])
OLD_V = THETA_V + jnp.array([0.5, -0.3, 0.2, 0.6, -0.7, 0.1])


def _reverse_kl(theta_V):  # KL(pi || ref)
  logp_V, ref_V = jax.nn.log_softmax(theta_V), jax.nn.log_softmax(REF_V)
  return jnp.sum(jnp.exp(logp_V) * (logp_V - ref_V))


def _forward_kl(theta_V):  # KL(ref || pi)
  logp_V, ref_V = jax.nn.log_softmax(theta_V), jax.nn.log_softmax(REF_V)
  return jnp.sum(jnp.exp(ref_V) * (ref_V - logp_V))


def _expected_kl_gradient(estimator, old_V):
  """sum_x pi_old(x) grad_theta kl(x): the mean gradient of the update's KL term over tokens
  sampled from pi_old, every token of the vocabulary enumerated (row 0, position = token)."""
  old_logp_V = jax.nn.log_softmax(old_V)

  def expected(theta_V):
    per_token = losses.kl(jax.nn.log_softmax(theta_V)[None], jax.nn.log_softmax(REF_V)[None],
                          old_logp_V[None], estimator)[0]
    return jnp.sum(jnp.exp(old_logp_V) * per_token)

  return jax.grad(expected)(THETA_V)


@pytest.mark.parametrize("estimator, divergence, old_V", [
    ("k3_ratio", _reverse_kl, THETA_V),
    ("k3_ratio", _reverse_kl, OLD_V),  # off-policy too: the ratio's gradient corrects it
    ("k2", _reverse_kl, THETA_V),
    ("k3", _forward_kl, THETA_V),
    ("k1", lambda theta_V: 0.0 * jnp.sum(theta_V), THETA_V),
])
def test_kl_mean_gradient_is_the_named_divergence(estimator, divergence, old_V):
  """docs/algorithms.md "KL": each estimator's exact expected gradient (a sum over the whole
  vocabulary, not a sample) equals the gradient of the divergence config.py names for it."""
  want = jax.grad(divergence)(THETA_V)
  np.testing.assert_allclose(_expected_kl_gradient(estimator, old_V), want, atol=1e-6)


def test_kl_gradients_that_differ_are_told_apart():
  """Guards the test above: the forward and reverse KL gradients are far apart here, and k2
  (and k3) off-policy give neither, which is why k3_ratio is the default."""
  reverse, forward = jax.grad(_reverse_kl)(THETA_V), jax.grad(_forward_kl)(THETA_V)
  assert float(jnp.abs(reverse - forward).max()) > 0.05
  for estimator in ("k2", "k3"):
    off = _expected_kl_gradient(estimator, OLD_V)
    assert float(jnp.abs(off - reverse).max()) > 0.01, estimator
    assert float(jnp.abs(off - forward).max()) > 0.01, estimator


def test_surrogate_gradient_at_ratio_one_is_reinforce():
  """d/dtheta of the clipped surrogate with old = stop_gradient(logp) is -A grad logp."""
  V, T = 5, 4
  theta_TV = jax.random.normal(jax.random.key(0), (T, V))
  tokens_BT = jnp.array([[0, 3, 1, 4], [2, 2, 0, 1]])
  mask_BT = jnp.array([[True, True, True, False], [True, True, True, True]])
  adv_B = jnp.array([0.7, -1.3])

  def logp_fn(theta_TV):
    logp_TV = jax.nn.log_softmax(theta_TV)
    return jnp.take_along_axis(jnp.broadcast_to(logp_TV, (2, T, V)), tokens_BT[..., None], -1)[..., 0]

  def surrogate(theta_TV):
    logp_BT = logp_fn(theta_TV)
    log_r = losses.log_ratio(logp_BT, jax.lax.stop_gradient(logp_BT), mask_BT, "token")
    loss_BT, _ = losses.clipped_surrogate(log_r, adv_B, 0.2, 0.2)
    s, d = _aggregate(loss_BT, mask_BT, "token_mean", T)
    return s / d

  def reinforce(theta_TV):
    return -jnp.sum(jnp.where(mask_BT, adv_B[:, None] * logp_fn(theta_TV), 0.0)) / mask_BT.sum()

  assert float(surrogate(theta_TV)) == pytest.approx(-float(jnp.sum(adv_B * mask_BT.sum(1))) / 7)
  g = jax.grad(surrogate)(theta_TV)
  assert float(jnp.abs(g).max()) > 0.01
  np.testing.assert_allclose(g, jax.grad(reinforce)(theta_TV), rtol=1e-5, atol=1e-7)


def test_overlong_penalty():
  pen = losses.overlong_penalty(jnp.array([5, 6, 8, 10, 12]), max_len=10, buffer=4, factor=0.5)
  np.testing.assert_allclose(pen, [0.0, 0.0, -0.25, -0.5, -0.5])
