"""Advantage estimators on rewards R[B, G] (B prompts, G completions each), chosen by name.

Each estimator gives A = R - b for its baseline b[B, G], then an optional scale (docs/algorithms.md):
`group` divides by each group's std (Bessel) + eps, `batch` by the std of all B * G rewards
(Bessel) + eps, `none` leaves A as is. For static and corpo, whose baseline is not a mean, `batch`
takes the spread about the baseline, sqrt(sum A^2 / (BG - 1)): an all-equal batch then gets
|A| < 1 instead of (R - tau) / eps. Every scaled advantage is at most 2 sqrt(N) in size, N the
values a std is taken over (docs/algorithms.md "Scaling"). Group means are computed relative to
the group's first reward, so a group of equal rewards gets exactly A = 0 (no float noise
amplified by 1 / eps).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from corpo_jax.rl.config import ESTIMATORS, SCALES, TAU_BASELINES, check_scale


def _group_mean(R_BG: jax.Array) -> jax.Array:
  R0_B1 = R_BG[:, :1]
  return R0_B1 + jnp.mean(R_BG - R0_B1, axis=-1, keepdims=True)


def _mean_centered(R_BG, tau):
  """GRPO and Dr. GRPO: b = group mean."""
  del tau
  return R_BG - _group_mean(R_BG)


def _rloo(R_BG, tau):
  """Leave-one-out mean b_i = mean_{j != i} R_j, i.e. A_i = G / (G - 1) * (R_i - mean)."""
  del tau
  G = R_BG.shape[-1]
  if G < 2:
    raise ValueError(f"advantage 'rloo' needs at least 2 completions per prompt, got G={G}.")
  return G / (G - 1) * (R_BG - _group_mean(R_BG))


def _static(R_BG, tau):
  """b = tau: always in correctness mode."""
  return R_BG - tau


def _corpo(R_BG, tau):
  """b = max(tau, group mean): correctness-seeking below tau, Dr. GRPO at or above it."""
  return R_BG - jnp.maximum(tau, _group_mean(R_BG))


# name -> unscaled advantages A = R - b of rewards [B, G] and the threshold tau.
ESTIMATOR_FNS: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    "grpo": _mean_centered,
    "dr_grpo": _mean_centered,
    "rloo": _rloo,
    "static": _static,
    "corpo": _corpo,
}
assert tuple(ESTIMATOR_FNS) == ESTIMATORS


def compute(name: str, rewards_BG: jax.Array, *, tau: float = 0.0, scale: str = "none",
            eps: float = 1e-4) -> jax.Array:
  """Advantages A[B, G] (float32) of estimator `name` with the given scaling."""
  if name not in ESTIMATOR_FNS:
    raise ValueError(f"Unknown advantage estimator {name!r}; registered: {sorted(ESTIMATOR_FNS)}.")
  if scale not in SCALES:
    raise ValueError(f"Unknown advantage scale {scale!r}; choose one of {SCALES}.")
  check_scale(name, scale)
  R_BG = rewards_BG.astype(jnp.float32)
  A_BG = ESTIMATOR_FNS[name](R_BG, tau)
  if scale == "group":
    A_BG = A_BG / (_std(R_BG - _group_mean(R_BG), axis=-1) + eps)
  elif scale == "batch":
    spread_BG = A_BG if name in TAU_BASELINES else R_BG - jnp.mean(R_BG)
    A_BG = A_BG / (_std(spread_BG, axis=None) + eps)
  return A_BG


def _std(centered: jax.Array, axis: int | None) -> jax.Array:
  """Bessel-corrected std of values already centred on their reference point (0 for one value)."""
  n = centered.size if axis is None else centered.shape[axis]
  var = jnp.sum(centered ** 2, axis=axis, keepdims=axis is not None) / max(n - 1, 1)
  return jnp.sqrt(var)


def diagnostics(rewards_BG: jax.Array, advantages_BG: jax.Array, tau: float) -> dict[str, jax.Array]:
  """The CoRPO diagnostics (docs/algorithms.md) (float32 scalars, never NaN for finite inputs) of
  the rewards the advantages were computed from (after any shaping, e.g. the overlong penalty).

  A ratio whose denominator count is 0 divides by 1 instead: frac_failed_positive is 0 when no
  completion failed, pos_neg_ratio is #{A > 0} when no advantage is negative.
  """
  R_BG = rewards_BG.astype(jnp.float32)
  failed = R_BG < tau
  pos, neg = advantages_BG > 0, advantages_BG < 0
  count = lambda x: jnp.sum(x, dtype=jnp.float32)
  return {
      "adv/frac_failed_positive": count(failed & pos) / jnp.maximum(count(failed), 1.0),
      "adv/pos_neg_ratio": count(pos) / jnp.maximum(count(neg), 1.0),
      "adv/frac_correctness_mode": jnp.mean((_group_mean(R_BG) < tau).astype(jnp.float32)),
      "reward/frac_zero_std": jnp.mean(
          (jnp.max(R_BG, axis=-1) == jnp.min(R_BG, axis=-1)).astype(jnp.float32)),
  }
