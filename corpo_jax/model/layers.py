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

  Without a cache the keys are this call's tokens (S == T). With a cache ({"k", "v"}: [B, K, S, H])
  this call's T keys and values are first written at slots write_index .. write_index + T - 1
  (dynamic-update-slice, in place in a decode loop's carry) and the queries attend over all S
  slots; `mask_BTS` says which slots each query may see (causality, padding, unwritten slots).
  Returns (new_cache, out_BTD): new_cache is the updated {"k", "v"}; None without a cache.
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
    if cache is None:
      k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None
      logits_BKQTS = jnp.einsum("BTKQH,BSKH->BKQTS", q_BTKQH, k_BSKH,
                                preferred_element_type=jnp.float32)
    else:  # write first, then read the whole buffer: XLA keeps the write in place (no copy)
      write = lambda c_BKSH, x_BTKH: jax.lax.dynamic_update_slice(
          c_BKSH, jnp.swapaxes(x_BTKH, 1, 2).astype(c_BKSH.dtype), (0, 0, write_index, 0))
      new_cache = {"k": write(cache["k"], k_BTKH), "v": write(cache["v"], v_BTKH)}
      logits_BKQTS = jnp.einsum("BTKQH,BKSH->BKQTS", q_BTKQH, new_cache["k"].astype(dt),
                                preferred_element_type=jnp.float32)
    probs_BKQTS = _softmax(logits_BKQTS * H ** -0.5, mask_BTS, dt)
    if cache is None:
      out_BTKQH = jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTS, v_BSKH)
    else:
      out_BTKQH = jnp.einsum("BKQTS,BKSH->BTKQH", probs_BKQTS, new_cache["v"].astype(dt))
    out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTKQH.reshape(B, T, N, H), w_o.astype(dt))
    return new_cache, constrain(out_BTD, ("batch", "length", "act_embed"))


def _softmax(logits_BKQTS: jax.Array, mask_BTS: jax.Array, dt: Any) -> jax.Array:
  return jax.nn.softmax(jnp.where(mask_BTS[:, None, None], logits_BKQTS, NEG_INF), -1).astype(dt)
