"""Dense building blocks: parameters with logical axes, RMSNorm, rotary embeddings, GQA attention."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from corpo_jax.model.config import ModelConfig
from corpo_jax.sharding import constrain

NEG_INF = -1e30  # finite: masked logits never produce NaN


def fan_in_init(in_axis: int | Sequence[int], out_axis: int | Sequence[int],
                batch_axis: Sequence[int] = ()) -> Callable:
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
          init: Callable, cfg: ModelConfig) -> jax.Array:
  """Declares a parameter annotated with logical axis names (see corpo_jax.sharding.RULES)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    scale_D = param(self, "scale", (x_BTD.shape[-1],), ("norm",), nn.initializers.ones, self.cfg)
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (scale_D.astype(jnp.float32) * x).astype(self.cfg.dtype)


def rope(x_BTNH: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split convention (HF `rotate_half`), computed in float32."""
  half = x_BTNH.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x_BTNH.shape[-1])
  angle_BTH = pos_BT[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angle_BTH)[:, :, None, :], jnp.sin(angle_BTH)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


class Attention(nn.Module):
  """Causal grouped-query attention with RoPE and an optional KV cache.

  Without a cache the keys are this call's tokens (S == T). With a cache ({"k", "v"}: [B, S, K, H])
  the queries attend over the cached slots before `write_index` and this call's T tokens, which
  belong at slots write_index .. write_index + T - 1; `mask_BTS` says which of the S slots each
  query may see (causality, padding, unwritten slots). Returns (new_cache, out_BTD): new_cache
  holds only this call's keys and values ({"k", "v"}: [B, T, K, H]) for the caller to write into
  its cache (in place, outside the layer stack); None without a cache.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, mask_BTS: jax.Array,
               cache: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None) -> tuple[Any, jax.Array]:
    cfg = self.cfg
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_q = param(self, "q", (D, N, H), ("embed", "heads", "head_dim"), fan_in_init(0, (1, 2)), cfg)
    w_k = param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"), fan_in_init(0, (1, 2)), cfg)
    w_v = param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"), fan_in_init(0, (1, 2)), cfg)
    w_o = param(self, "o", (N, H, D), ("heads", "head_dim", "embed"), fan_in_init((0, 1), 2), cfg)
    dt = cfg.dtype
    x = x_BTD.astype(dt)
    q_BTNH = rope(jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(dt)), pos_BT, cfg.rope_theta)
    k_BTKH = rope(jnp.einsum("BTD,DKH->BTKH", x, w_k.astype(dt)), pos_BT, cfg.rope_theta)
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x, w_v.astype(dt))
    q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))

    B, T = x_BTD.shape[:2]
    q_BTKQH = q_BTNH.reshape(B, T, K, N // K, H)  # Q: query heads per kv head
    logits_BKQTT = jnp.einsum("BTKQH,BSKH->BKQTS", q_BTKQH, k_BTKH,
                              preferred_element_type=jnp.float32) * H ** -0.5
    if cache is None:
      probs_BKQTT = _softmax(logits_BKQTT, mask_BTS, dt)
      out_BTKQH = jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTT, v_BTKH)
      new_cache = None
    else:  # cached slots before write_index, then this call's T tokens; the caller writes k, v
      S = cache["k"].shape[1]
      old_BTS = mask_BTS & (jnp.arange(S) < write_index)
      new_BTT = jax.lax.dynamic_slice_in_dim(mask_BTS, write_index, T, axis=2)
      logits_BKQTS = _cached_scores(q_BTKQH, cache["k"].astype(dt)) * H ** -0.5
      probs = _softmax(jnp.concatenate([logits_BKQTS, logits_BKQTT], -1),
                       jnp.concatenate([old_BTS, new_BTT], -1), dt)
      out_BTKQH = (_cached_mix(probs[..., :S], cache["v"].astype(dt))
                   + jnp.einsum("BKQTS,BSKH->BTKQH", probs[..., S:], v_BTKH))
      new_cache = {"k": k_BTKH.astype(cache["k"].dtype), "v": v_BTKH.astype(cache["v"].dtype)}
    out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTKQH.reshape(B, T, N, H), w_o.astype(dt))
    return new_cache, constrain(out_BTD, ("batch", "length", "act_embed"))


def _softmax(logits_BKQTS: jax.Array, mask_BTS: jax.Array, dt: Any) -> jax.Array:
  return jax.nn.softmax(jnp.where(mask_BTS[:, None, None], logits_BKQTS, NEG_INF), -1).astype(dt)


def _cached_scores(q_BTKQH: jax.Array, k_BSKH: jax.Array) -> jax.Array:
  """Query-key scores over cache slots (float32). One decode token (T == 1) uses a
  multiply-reduce that XLA fuses with the read of the cache: no copy or transpose of it."""
  if q_BTKQH.shape[1] > 1:
    return jnp.einsum("BTKQH,BSKH->BKQTS", q_BTKQH, k_BSKH, preferred_element_type=jnp.float32)
  prod = q_BTKQH[:, 0, None].astype(jnp.float32) * k_BSKH[:, :, :, None].astype(jnp.float32)
  return jnp.sum(prod, -1).transpose(0, 2, 3, 1)[:, :, :, None]  # BSKQ -> BKQ1S


def _cached_mix(probs_BKQTS: jax.Array, v_BSKH: jax.Array) -> jax.Array:
  """Probability-weighted cache values [B, T, K, Q, H] (multiply-reduce for T == 1, as above)."""
  if probs_BKQTS.shape[3] > 1:
    return jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTS, v_BSKH)
  p_BSKQ1 = probs_BKQTS[:, :, :, 0].transpose(0, 3, 1, 2)[..., None]
  return jnp.sum(p_BSKQ1 * v_BSKH[:, :, :, None], axis=1)[:, None]
