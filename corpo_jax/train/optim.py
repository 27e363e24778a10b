"""The optimizer of SFT and RL stages: AdamW (optax.adamw's state), warmup + cosine learning
rate, global-norm clipping and frozen leaves (`make_optimizer`), its run-time hyperparameters
(`hyperparams`), and the step that applies it unless the loss or gradients are not finite
(`apply_if_finite`).

The learning rate, its warmup and decay, weight decay and tau (RUNTIME_FIELDS) are float32
inputs of the compiled steps, not constants, so configs that differ only in them share one
program (`program_config`, `program_optimizer`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from corpo_jax import model
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig
from corpo_jax.train.state import TrainState, merge_trainable, trainable_mask

# Fields whose values the compiled steps take as run-time float32 inputs (`hyperparams`), not as
# constants: stages and runs that differ only in these (rl and specialize, a tau or learning-rate
# sweep) lower to the same program, so the persistent compilation cache (compile_cache.py)
# compiles it once.
RUNTIME_FIELDS = ("tau", "learning_rate", "warmup_steps", "decay_steps", "weight_decay")
LR_FIELDS = ("learning_rate", "warmup_steps", "decay_steps")  # learning_rate_at's arguments
SCHEDULE_FIELDS = LR_FIELDS + ("weight_decay",)  # the optimizer's run-time values


def hyperparams(rl_cfg: RLConfig) -> dict[str, np.float32]:
  """rl_cfg's RUNTIME_FIELDS as float32 scalars: the compiled steps' run-time arguments."""
  return {f: np.float32(getattr(rl_cfg, f)) for f in RUNTIME_FIELDS}


def learning_rate_at(count, learning_rate, warmup_steps, decay_steps) -> jax.Array:
  """Linear warmup from 0 over `warmup_steps`, then cosine decay to 0 over `decay_steps`
  (constant if 0). The values may be traced, so one program serves any schedule; the arithmetic
  is optax's warmup_cosine_decay_schedule's, operation for operation (bit-identical values)."""
  count = jnp.asarray(count, jnp.float32)
  frac = 1.0 - jnp.minimum(count, warmup_steps) / jnp.maximum(warmup_steps, 1.0)
  warming = (0.0 - learning_rate) * frac + learning_rate
  since = jnp.minimum(count - warmup_steps, decay_steps)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * since / jnp.maximum(decay_steps, 1.0)))
  after = jnp.where(decay_steps > 0, learning_rate * cosine, learning_rate)
  return jnp.where(count < warmup_steps, warming, after)


def schedule(rl_cfg: RLConfig) -> optax.Schedule:
  """The learning rate after `count` optimizer steps under rl_cfg (learning_rate_at)."""
  return lambda count: learning_rate_at(count, rl_cfg.learning_rate, rl_cfg.warmup_steps,
                                        rl_cfg.decay_steps)


def _extra(defaults: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
  return {f: extra.get(f, v) for f, v in defaults.items()}


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm as one scalar factor on every leaf: g * min(1, max_norm / norm)
  (optax's per-leaf select of g or g / norm * max_norm agrees to a float32 rounding; XLA:CPU
  wrote that out as one more pass over the gradients, the factor fuses into the Adam moments).
  Same (empty) state."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_adam(b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_adam (its state and arithmetic) that can skip a step: with the extra
  argument `finite` False the moments and count stay as they were, and the updates (computed
  from the kept moments with the next count, so finite) are zeroed by `scale_by_learning_rate`.
  Computing the updates from the kept moments lets XLA write the moments in place and read
  the new ones in the parameter pass; a select of new against old state after an unaware
  optimizer made XLA:CPU copy both moments first (AdamW over 102M parameters: 372 -> 114 ms
  with `clip_by_global_norm`; docs/benchmarks.md)."""

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update(updates, state, params=None, finite=True, **extra):
    del params, extra
    keep = lambda new, old: jnp.where(finite, new, old)
    mu = jax.tree.map(lambda g, m: keep((1 - b1) * g + b1 * m, m), updates, state.mu)
    nu = jax.tree.map(lambda g, v: keep((1 - b2) * g**2 + b2 * v, v), updates, state.nu)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(count=keep(count, state.count), mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def add_decayed_weights(rl_cfg: RLConfig) -> optax.GradientTransformationExtraArgs:
  """optax.add_decayed_weights with weight_decay from the update's extra arguments when given
  (the compiled steps pass `hyperparams`), else rl_cfg's. Same state as optax's (empty)."""
  defaults = {"weight_decay": float(rl_cfg.weight_decay)}

  def update(updates, state, params=None, **extra):
    wd = _extra(defaults, extra)["weight_decay"]
    return jax.tree.map(lambda u, p: u + wd * p, updates, params), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def scale_by_learning_rate(rl_cfg: RLConfig) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate(schedule(rl_cfg)) with learning_rate, warmup_steps and
  decay_steps from the update's extra arguments when given, else rl_cfg's. Same state as
  optax's (ScaleByScheduleState: the optimizer steps applied). With the extra argument `finite`
  False the updates are zeroed and the count stays."""
  defaults = {f: float(getattr(rl_cfg, f)) for f in LR_FIELDS}

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, finite=True, **extra):
    del params
    lr = jnp.where(finite, learning_rate_at(state.count, **_extra(defaults, extra)), 0.0)
    updates = jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates)
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformationExtraArgs(init, update)


class SkippingOptimizer(optax.GradientTransformationExtraArgs):
  """An optimizer whose update takes the extra argument `finite` (a traced bool) and, when it
  is False, returns zero updates and the state it was given (`make_optimizer`'s AdamW).
  `apply_if_finite` then needs no select of new against old state."""


def make_optimizer(rl_cfg: RLConfig, params: Any) -> optax.GradientTransformationExtraArgs:
  """AdamW (optax.adamw's arithmetic to a float32 rounding, and its state) with `schedule`,
  global-norm clipping (over trainable leaves), and `freeze`: frozen leaves get no update and no
  optimizer state. `params` may be abstract (shapes only). Its update takes SCHEDULE_FIELDS and
  `finite` (SkippingOptimizer) as optional extra arguments (run-time values)."""
  adamw = optax.chain(scale_by_adam(b1=rl_cfg.b1, b2=rl_cfg.b2),
                      add_decayed_weights(rl_cfg), scale_by_learning_rate(rl_cfg))
  train = optax.chain(
      clip_by_global_norm(rl_cfg.grad_clip_norm) if rl_cfg.grad_clip_norm else optax.identity(),
      adamw)  # optax.adamw's state layout: checkpoints of earlier versions restore
  mask = trainable_mask(rl_cfg.freeze, params)
  if all(jax.tree.leaves(mask)):
    return SkippingOptimizer(*train)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  return SkippingOptimizer(*optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                                                  labels))


def apply_if_finite(state: TrainState, grads: Any, frozen: Any, loss: jax.Array,
                    optimizer: optax.GradientTransformation,
                    hp: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One optimizer step with the trainable leaves' `grads` and the run-time `hp` (hyperparams);
  if the loss or the gradients' global norm is non-finite (a nan or inf element, or a norm that
  overflows float32), params and optimizer state stay as they were and `skipped` counts it.
  One check on the norm (computed anyway) compiles to a few kernels where a per-leaf isfinite
  reduction cost the SFT step ~1.5 s of compile. A SkippingOptimizer keeps its state itself;
  for any other optimizer a per-leaf select of new against old state does it (a lax.cond
  instead compiles less but made the update ~7% slower; docs/benchmarks.md)."""
  grads = merge_trainable(grads, jax.tree.map(jnp.zeros_like, frozen))  # ignored by set_to_zero
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skipping = isinstance(optimizer, SkippingOptimizer)
  extra = {f: hp[f] for f in SCHEDULE_FIELDS} | ({"finite": finite} if skipping else {})
  updates, opt_state = optax.with_extra_args_support(optimizer).update(
      grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  if not skipping:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  state = state.replace(params=params, opt_state=opt_state,
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, {"grad_norm": grad_norm, "applied": finite.astype(jnp.float32)}


def program_config(rl_cfg: RLConfig) -> RLConfig:
  """rl_cfg with its RUNTIME_FIELDS at RLConfig's defaults: all the compiled step depends on."""
  defaults = RLConfig()
  return dataclasses.replace(rl_cfg, **{f: getattr(defaults, f) for f in RUNTIME_FIELDS})


def program_optimizer(model_cfg: ModelConfig,
                      rl_cfg: RLConfig) -> optax.GradientTransformationExtraArgs:
  """`make_optimizer`'s AdamW for rl_cfg's program config, one object per (model, program
  config): the state of `make_optimizer(rl_cfg, params)`, the schedule and weight decay taken
  as run-time values only (`hyperparams`). Stages that differ only in RUNTIME_FIELDS get the
  same optimizer, hence the same jitted step (`make_update`)."""
  return _program_optimizer(model_cfg, program_config(rl_cfg))


@functools.lru_cache(maxsize=16)
def _program_optimizer(model_cfg: ModelConfig, program: RLConfig):
  return make_optimizer(program, model.abstract_params(model_cfg))
