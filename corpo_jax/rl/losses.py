"""Per-token policy-gradient losses, KL estimators, token aggregation and reward shaping.

Everything works on [B, T] arrays of log-probs of the sampled tokens (float32) and a loss mask;
B here is the number of completions (rows). Aggregation is an unreduced sum (`aggregate_sum`)
over a denominator (`aggregate_denominator`), so the loss over micro-batches is
sum_m sum_m / denominator(full batch): an exact weighted mean, not a mean of means. The modes:

* seq_mean_token_mean: mean over each row's tokens, then mean over rows (GRPO);
* token_mean: mean over all loss tokens of the batch (DAPO);
* seq_mean_token_sum_norm: each row's token sum / max_len, mean over all rows (Dr. GRPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from corpo_jax.rl.config import AGGREGATIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS


def log_ratio(logp_BT: jax.Array, old_BT: jax.Array, mask_BT: jax.Array, level: str) -> jax.Array:
  """log r per token: `token` level logp - old (PPO); `sequence` level the row's mean of
  logp - old over its loss tokens, repeated on every token (GSPO)."""
  if level not in IMPORTANCE_LEVELS:
    raise ValueError(f"Unknown importance_level {level!r}; choose one of {IMPORTANCE_LEVELS}.")
  diff_BT = jnp.where(mask_BT, logp_BT - old_BT, 0.0)
  if level == "token":
    return diff_BT
  n_B1 = jnp.maximum(mask_BT.sum(-1, keepdims=True), 1)
  return jnp.broadcast_to(diff_BT.sum(-1, keepdims=True) / n_B1, diff_BT.shape)


def clipped_surrogate(log_ratio_BT: jax.Array, adv_B: jax.Array, eps_low: float,
                      eps_high: float) -> tuple[jax.Array, jax.Array]:
  """PPO-clip loss per token, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and a bool of
  the tokens where the clipped branch is the active one (its gradient is 0)."""
  r_BT = jnp.exp(log_ratio_BT)
  A_B1 = adv_B[:, None].astype(jnp.float32)
  unclipped_BT = r_BT * A_B1
  clipped_BT = jnp.clip(r_BT, 1.0 - eps_low, 1.0 + eps_high) * A_B1
  is_clipped_BT = clipped_BT < unclipped_BT
  return -jnp.minimum(unclipped_BT, clipped_BT), is_clipped_BT


def kl(logp_BT: jax.Array, ref_BT: jax.Array, old_BT: jax.Array, estimator: str) -> jax.Array:
  """Per-token KL penalty on tokens sampled from pi_old (log-probs old_BT, constants; equal to
  logp_BT on the first iteration), differentiated through logp_BT only. Its expected gradient,
  per position given the prefix (derived in docs/algorithms.md "KL"):

  * k3_ratio: r * k3 with r = pi_theta / pi_old, gradient kept: grad KL(pi_theta || pi_ref) for
    any pi_old (TRL's use_bias_correction_kl at token level);
  * k2: (logp - ref)^2 / 2: grad KL(pi_theta || pi_ref) while pi_old = pi_theta;
  * k3: exp(ref - logp) - (ref - logp) - 1: grad KL(pi_ref || pi_theta), the forward KL;
  * k1: logp - ref: 0 (its value estimates the KL, its gradient is noise).
  """
  d_BT = ref_BT - logp_BT
  if estimator == "k1":
    return -d_BT
  if estimator == "k2":
    return 0.5 * d_BT ** 2
  k3_BT = jnp.exp(d_BT) - d_BT - 1.0
  if estimator == "k3":
    return k3_BT
  if estimator == "k3_ratio":
    return jnp.exp(logp_BT - jax.lax.stop_gradient(old_BT)) * k3_BT
  raise ValueError(f"Unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")


def aggregate_sum(x_BT: jax.Array, mask_BT: jax.Array, mode: str, max_len: int) -> jax.Array:
  """The unreduced numerator of aggregation `mode` (module doc)."""
  x_BT = jnp.where(mask_BT, x_BT, 0.0)
  if mode == "token_mean":
    return x_BT.sum()
  if mode == "seq_mean_token_mean":
    return (x_BT.sum(-1) / jnp.maximum(mask_BT.sum(-1), 1)).sum()
  if mode == "seq_mean_token_sum_norm":
    return x_BT.sum() / max_len
  raise ValueError(f"Unknown aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def aggregate_denominator(mask_BT: jax.Array, mode: str) -> jax.Array:
  """The denominator of aggregation `mode`: loss tokens for token_mean; rows with at least one
  loss token for seq_mean_token_mean (a row masked out entirely, e.g. by mask_truncated, has no
  mean to count); every row for seq_mean_token_sum_norm, whose normaliser rows * max_len is a
  constant of the batch shape (Dr. GRPO)."""
  if mode == "token_mean":
    return mask_BT.sum(dtype=jnp.float32)
  if mode == "seq_mean_token_sum_norm":
    return jnp.float32(mask_BT.shape[0])
  return mask_BT.any(-1).sum(dtype=jnp.float32)


def overlong_penalty(lengths_B: jax.Array, max_len: int, buffer: int, factor: float) -> jax.Array:
  """DAPO's soft overlong penalty (<= 0), added to the reward: 0 up to max_len - buffer tokens,
  then falling linearly to -factor at max_len, -factor beyond."""
  over_B = lengths_B.astype(jnp.float32) - (max_len - buffer)
  return -factor * jnp.clip(over_B / buffer, 0.0, 1.0)
