"""The train state of SFT and RL stages: a TrainState, its initialisation and shardings, and the
freeze mask (which parameters a stage trains).

`init_state(model_cfg, optimizer, params, mesh)` makes a state at step 0 laid out in
`state_shardings` (optimizer moments follow their parameter); `abstract_state` is its shapes, a
checkpoint's restore target. `trainable_mask(freeze, params)` turns a stage's freeze patterns
into a tree of bools; a step differentiates the trainable leaves only (`split_trainable`,
`merge_trainable`).
"""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import BASE


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: update() calls so far
  params: Any
  opt_state: Any
  skipped: jax.Array  # int32: optimizer steps skipped for a non-finite loss or gradient


# ----------------------------------------------------------------------------- freeze mask


def param_paths(params: Any) -> Any:
  """The "/"-joined path of every leaf, e.g. "layers/moe/router" (same tree structure)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: "/".join(str(k.key) for k in kp), nn.unbox(params))


def trainable_mask(freeze: tuple[str, ...], params: Any) -> Any:
  """True for leaves that no `freeze` pattern matches; each pattern must match some leaf.

  A pattern matches a path when it matches (re.match) the path up to a "/" or its end:
  "layers/attn" freezes layers/attn/q, ... but not layers/attn_norm.
  """
  paths = param_paths(params)
  flat = jax.tree.leaves(paths)
  def frozen_by(pattern: str, path: str) -> bool:
    if pattern == BASE:
      return not (path == "thinking" or path.startswith("thinking/"))
    return re.match(f"(?:{pattern})(?:/|$)", path) is not None
  for pattern in freeze:
    if not any(frozen_by(pattern, p) for p in flat):
      raise ValueError(f"rl.freeze pattern {pattern!r} matches no parameter; paths look like "
                       f"{flat[:4]} (or use {BASE!r} for all but params['thinking']).")
  return jax.tree.map(lambda p: not any(frozen_by(f, p) for f in freeze), paths)


def merge_trainable(a: Any, b: Any) -> Any:
  """Leaves of `a`, with `b`'s where `a` holds None (same structure otherwise)."""
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def split_trainable(params: Any, trainable: Any) -> tuple[Any, Any]:
  """(trainable leaves with None for frozen ones, frozen leaves with None for trainable ones):
  differentiate the first, close over the second, `merge_trainable` them back."""
  train = jax.tree.map(lambda p, t: p if t else None, params, trainable)
  frozen = jax.tree.map(lambda p, t: None if t else p, params, trainable)
  return train, frozen


# ----------------------------------------------------------------------------- state


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their parameter, the rest replicated."""
  abstract = nn.unbox(model.abstract_params(model_cfg))
  param_sh = model.param_shardings(model_cfg, mesh)
  by_path = {}
  for kp, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]:
    by_path[tuple(k.key for k in kp)] = sh

  def one(kp, leaf):
    keys = tuple(k.key for k in kp if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):  # optax may nest the moments under its own dict keys
      if keys[start:] in by_path and leaf.ndim:
        return by_path[keys[start:]]
    return sharding.replicated(mesh)

  opt_sh = jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, abstract))
  rep = sharding.replicated(mesh)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, skipped=rep)


def abstract_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
  """The TrainState's shapes with its shardings on `mesh` (a restore target, or what a memory
  estimate counts); nothing is allocated."""
  shapes = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                           skipped=jnp.zeros((), jnp.int32)),
      nn.unbox(model.abstract_params(model_cfg)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings(model_cfg, optimizer, mesh))


def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, params: Any,
               mesh: Mesh | None = None) -> TrainState:
  """A TrainState at step 0 holding a copy of `params` (so the caller may keep `params` as the
  reference policy while the state is donated), laid out in `state_shardings`."""
  def init(params):
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), skipped=jnp.zeros((), jnp.int32))
  if mesh is None:
    return jax.jit(init)(params)
  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=state_shardings(model_cfg, optimizer, mesh))(params)
