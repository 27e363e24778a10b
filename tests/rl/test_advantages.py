"""Advantage estimators: hand-computed cases and property tests (docs/algorithms.md)."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax.rl import advantages
from corpo_jax.rl.config import ESTIMATORS, SCALES, check_scale

# Ordinal grades 1..5 with a pass threshold tau = 3.
R_WEAK = np.array([[1.0, 1.0, 2.0]])  # every completion fails; 2 is the "less bad" failure
R_TWO = np.array([[1.0, 1.0, 2.0], [3.0, 5.0, 4.0]])


def _adv(name, R, **kw):
  return np.asarray(advantages.compute(name, jnp.asarray(R, jnp.float32), **kw))


def test_grpo_rewards_a_failure_where_corpo_and_static_do_not():
  grpo = _adv("grpo", R_WEAK, tau=3.0)
  np.testing.assert_allclose(grpo, [[-1 / 3, -1 / 3, 2 / 3]], rtol=1e-6)
  assert grpo[0, 2] > 0  # R = 2 < tau, yet reinforced
  np.testing.assert_allclose(_adv("corpo", R_WEAK, tau=3.0), [[-2.0, -2.0, -1.0]])
  np.testing.assert_allclose(_adv("static", R_WEAK, tau=3.0), [[-2.0, -2.0, -1.0]])
  d = advantages.diagnostics(jnp.asarray(R_WEAK), jnp.asarray(grpo), 3.0)
  assert float(d["adv/frac_failed_positive"]) == pytest.approx(1 / 3)
  d = advantages.diagnostics(jnp.asarray(R_WEAK), jnp.asarray(_adv("corpo", R_WEAK, tau=3.0)), 3.0)
  assert float(d["adv/frac_failed_positive"]) == 0.0


def test_every_estimator_unscaled():
  R = np.array([[1.0, 2.0, 4.0]])
  mean_centered = [[-4 / 3, -1 / 3, 5 / 3]]
  np.testing.assert_allclose(_adv("grpo", R), mean_centered, rtol=1e-6)
  np.testing.assert_allclose(_adv("dr_grpo", R), mean_centered, rtol=1e-6)
  np.testing.assert_allclose(_adv("rloo", R), [[1 - 3.0, 2 - 2.5, 4 - 1.5]], rtol=1e-6)
  np.testing.assert_allclose(_adv("static", R, tau=3.0), [[-2.0, -1.0, 1.0]])
  # Group mean 7/3 < tau = 3: correctness mode, baseline tau.
  np.testing.assert_allclose(_adv("corpo", R, tau=3.0), [[-2.0, -1.0, 1.0]])
  # Group mean 7/3 >= tau = 2: preference mode, equals Dr. GRPO.
  np.testing.assert_allclose(_adv("corpo", R, tau=2.0), mean_centered, rtol=1e-6)


def test_group_scale():
  # mean 4/3, Bessel variance (1/9 + 1/9 + 4/9) / 2 = 1/3.
  std = np.sqrt(1 / 3)
  np.testing.assert_allclose(_adv("grpo", R_WEAK, scale="group", eps=0.0),
                             [[-1 / 3 / std, -1 / 3 / std, 2 / 3 / std]], rtol=1e-6)
  np.testing.assert_allclose(_adv("rloo", R_WEAK, scale="group", eps=0.0),
                             [[-0.5 / std, -0.5 / std, 1.0 / std]], rtol=1e-6)


def test_batch_scale():
  std = np.std(R_TWO, ddof=1)  # 1.6329932
  assert std == pytest.approx(1.6329932)
  np.testing.assert_allclose(_adv("grpo", R_TWO, scale="batch", eps=0.0),
                             (R_TWO - R_TWO.mean(1, keepdims=True)) / std, rtol=1e-6)
  # corpo and static: the spread about their baseline, sqrt(sum A^2 / (6 - 1)).
  # corpo: group means 4/3 < 3 (baseline 3) and 4 >= 3 (baseline 4).
  corpo = np.array([[-2.0, -2.0, -1.0], [-1.0, 1.0, 0.0]])  # sum A^2 = 11
  np.testing.assert_allclose(_adv("corpo", R_TWO, tau=3.0, scale="batch", eps=0.0),
                             corpo / np.sqrt(11 / 5), rtol=1e-6)
  static = R_TWO - 3.0  # sum A^2 = 4 + 4 + 1 + 0 + 4 + 1 = 14
  np.testing.assert_allclose(_adv("static", R_TWO, tau=3.0, scale="batch", eps=0.0),
                             static / np.sqrt(14 / 5), rtol=1e-6)


def test_all_equal_failing_batch_stays_small():
  """Every completion graded 1 with tau 5: A = R - tau = -4 everywhere. Divided by the batch std
  (0) + eps this was -4 / 1e-6; about the baseline the spread is 4 sqrt(6 / 5)."""
  R = np.ones((2, 3))
  for name in ("static", "corpo"):
    np.testing.assert_allclose(_adv(name, R, tau=5.0, scale="batch"),
                               np.full((2, 3), -4.0 / (4.0 * np.sqrt(6 / 5) + 1e-4)), rtol=1e-6)


def test_eps_damps_reward_differences_far_below_it():
  """Rewards 0 and 1e-5: group std 7.07e-6, so A = +-5e-6 / (7.07e-6 + eps). TRL's eps 1e-4
  gives 0.047 where 1e-6 gave full-size advantages of 0.62."""
  R = np.array([[0.0, 1e-5]])
  std = 1e-5 / np.sqrt(2)
  np.testing.assert_allclose(_adv("grpo", R, scale="group"),
                             [[-5e-6 / (std + 1e-4), 5e-6 / (std + 1e-4)]], rtol=1e-4)
  assert float(_adv("grpo", R, scale="group")[0, 1]) == pytest.approx(0.0467, abs=1e-4)
  assert float(_adv("grpo", R, scale="group", eps=1e-6)[0, 1]) == pytest.approx(0.619, abs=1e-3)


def test_equal_rewards_give_exactly_zero_with_group_scale():
  R = np.full((2, 5), 0.3)
  assert np.all(_adv("grpo", R, scale="group") == 0.0)


def test_rejected_combinations_name_the_fix():
  with pytest.raises(ValueError, match="use scale=none or batch"):
    advantages.compute("corpo", jnp.ones((1, 2)), scale="group")
  with pytest.raises(ValueError, match="use scale=none or batch"):
    advantages.compute("static", jnp.ones((1, 2)), scale="group")
  with pytest.raises(ValueError, match=r"registered: \['corpo', 'dr_grpo', 'grpo', 'rloo', 'static'\]"):
    advantages.compute("ppo", jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="G=1"):
    advantages.compute("rloo", jnp.ones((3, 1)))


def test_diagnostics_hand_computed_and_zero_denominators():
  R = jnp.asarray(R_TWO)
  A = jnp.asarray(_adv("grpo", R_TWO))  # [[-1/3, -1/3, 2/3], [-1, 1, 0]]
  d = {k: float(v) for k, v in advantages.diagnostics(R, A, 3.0).items()}
  assert d == pytest.approx({"adv/frac_failed_positive": 1 / 3, "adv/pos_neg_ratio": 2 / 3,
                             "adv/frac_correctness_mode": 0.5, "reward/frac_zero_std": 0.0})
  R = jnp.full((2, 3), 5.0)  # no failures, no negative advantages
  d = {k: float(v) for k, v in advantages.diagnostics(R, jnp.zeros((2, 3)), 3.0).items()}
  assert d == {"adv/frac_failed_positive": 0.0, "adv/pos_neg_ratio": 0.0,
               "adv/frac_correctness_mode": 0.0, "reward/frac_zero_std": 1.0}


def _accepted(name, scale):
  try:
    check_scale(name, scale)
  except ValueError:
    return False
  return True


# Every estimator with every scale it accepts.
COMBINATIONS = [(name, scale) for name in ESTIMATORS for scale in SCALES if _accepted(name, scale)]
assert len(COMBINATIONS) == 11  # grpo, rloo x 3; static, corpo x 2 (not group); dr_grpo x 1

rewards = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
                     elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]))
some_floats = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
                         elements=st.floats(-10, 10, width=32))
SETTINGS = hypothesis.settings(max_examples=60, deadline=None)


@SETTINGS
@hypothesis.given(R=st.one_of(rewards, some_floats), tau=st.floats(-5, 6),
                  scale=st.sampled_from(["none", "batch"]))
def test_corpo_and_static_never_reward_a_failure(R, tau, scale):
  for name in ("corpo", "static"):
    A = _adv(name, R, tau=tau, scale=scale)
    assert not np.any((R < np.float32(tau)) & (A > 0)), (name, R, tau, A)


@SETTINGS
@hypothesis.given(R=st.one_of(rewards, some_floats), margin=st.floats(0, 3))
def test_corpo_equals_dr_grpo_when_every_group_mean_reaches_tau(R, margin):
  tau = float(R.astype(np.float64).mean(1).min()) - margin - 1e-4
  np.testing.assert_allclose(_adv("corpo", R, tau=tau), _adv("dr_grpo", R), atol=1e-6)


@SETTINGS
@hypothesis.given(R=st.one_of(rewards, some_floats))
def test_rloo_is_rescaled_dr_grpo(R):
  G = R.shape[1]
  np.testing.assert_allclose(_adv("rloo", R), G / (G - 1) * _adv("dr_grpo", R), rtol=1e-5, atol=1e-5)


@SETTINGS
@hypothesis.given(value=st.floats(-1e6, 1e6, width=32), shape=st.tuples(st.integers(1, 5),
                  st.integers(2, 6)), tau=st.floats(-1e6, 1e6, width=32),
                  combination=st.sampled_from(COMBINATIONS))
def test_all_equal_rewards_give_finite_small_advantages(value, shape, tau, combination):
  """A batch whose rewards are all equal: zero advantages from the mean baselines, and for
  static and corpo either R - tau unscaled or, batch-scaled, at most 1 in size."""
  name, scale = combination
  R = np.full(shape, value, np.float32)
  A = _adv(name, R, tau=tau, scale=scale)
  assert np.all(np.isfinite(A)), (name, scale, A)
  if name not in ("static", "corpo"):
    assert np.all(A == 0.0), (name, scale, A)
  elif scale == "batch":
    assert np.all(np.abs(A) <= 1.0), (name, A)
  else:
    baseline = np.float32(tau) if name == "static" else np.maximum(np.float32(tau), R)
    np.testing.assert_allclose(A, R - baseline, rtol=1e-6)


@SETTINGS
@hypothesis.given(R=st.one_of(rewards, some_floats), tau=st.floats(-5, 6),
                  combination=st.sampled_from(COMBINATIONS))
def test_scaled_advantages_are_bounded(R, tau, combination):
  """|A| <= 2 sqrt(N), N the rewards a std is taken over (G for group, B * G for batch), for any
  rewards: the scale never lets a tiny spread blow an advantage up (docs/algorithms.md)."""
  name, scale = combination
  hypothesis.assume(scale != "none")
  A = _adv(name, R, tau=tau, scale=scale)
  N = R.shape[1] if scale == "group" else R.size
  assert np.all(np.abs(A) <= 2 * np.sqrt(N)), (name, scale, R, A)
