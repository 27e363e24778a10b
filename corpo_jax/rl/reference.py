"""The frozen reference policy of an RL stage's KL term, made from the stage's starting params.

`rl.reference_dtype`:
* "param": the starting params themselves (the trainer keeps them; the state holds a copy).
* "bfloat16": a copy with every floating leaf cast to bfloat16, laid out like the params: half
  the memory of float32 params, and every weight gather of the reference pass moves half the
  bytes (mixtral_8x7b on 4 x 16 x 4 x 1: 3.0 -> 1.5 GiB per device, the update's peak 23.7 ->
  22.2 GiB; docs/scale.md). With bfloat16 compute (the Mixtral presets) the matmuls read
  bfloat16 weights either way; the float32 router, norm scales and logits read rounded weights,
  so the reference's log-probs move a little (the tiny preset: mean |d logp| 0.002, max 0.01;
  tests/rl/test_reference.py), a bias of the KL term far below its usual size. The trainer
  then drops its float32 starting params (train/loop.py `StartParams`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def reference_policy(params: Any, dtype: str) -> Any:
  """The reference policy from `params` (arrays, or jax.ShapeDtypeStructs for a memory
  estimate: the abstract copy keeps their shardings)."""
  if dtype == "param":
    return params
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, _cast_dtype(x.dtype, dtype), sharding=x.sharding), params)
  return _cast(params, dtype)


def _cast_dtype(current, dtype: str):
  return jnp.dtype(dtype) if jnp.issubdtype(current, jnp.floating) else current


@functools.partial(jax.jit, static_argnums=1)
def _cast(params: Any, dtype: str) -> Any:
  """Elementwise, so each output keeps its input's sharding: no gather, a shard per device."""
  return jax.tree.map(lambda x: x.astype(_cast_dtype(x.dtype, dtype)), params)
