"""The RL update: a pure, jitted step from a rollout batch to new parameters.

`update = make_update(model_cfg, rl_cfg, mesh[, optimizer])` compiles once (explicit in/out
shardings, donated state) a function

    update(state: TrainState, batch: Batch, ref_params=None) -> (state, metrics)

(tau and the optimizer schedule, rl_cfg's RUNTIME_FIELDS, are run-time inputs, not constants)
that, for `rl_cfg.num_iterations` optimizer steps on the same batch: computes advantages from
the rewards (plus the overlong penalty), the policy's log-probs of the completion tokens
(logits / temperature projected chunk by chunk over time, so [B, T, V] is never live), the
PPO/GSPO surrogate, beta * KL against `ref_params` (needed only when beta > 0), the MoE
auxiliary losses, and gradients accumulated over micro-batches as an exact weighted mean. The
loss and KL cover the sampled completion tokens only: tokens the sampler forced (Batch.forced)
are left out unless rl.loss_on_forced (docs/algorithms.md). A step
whose loss or gradients are not finite is skipped: parameters and optimizer state stay as they
were and `state.skipped` counts it. Nothing is random, so no rng is taken.

Log-probs live in "token space": logp_BT[:, t] = log pi(tokens[t] | tokens[:t]) (from the
logits at t - 1; 0 at t = 0), aligned with Batch.loss_mask.
Shared prompts (`rl.share_prompt`, Batch.prompt_len > 0 as `make_batch` sets it): the policy and
reference passes run each group's prompt once into a KV cache that its G rows read
(`shared_prompt_logprobs`), the same values to float rounding; prompt tokens then get log-prob 0
(they carry no loss).
Micro-batch m holds rows m, m + M, m + 2M, ... so every device keeps an equal share of each.
Aux losses of a micro-batch are its own means (load balance is not additive over tokens); the
update adds their mean over micro-batches, so accumulation equals the full batch exactly only
for the policy loss and KL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl import advantages, losses
from corpo_jax.rl.config import BASE, RLConfig

BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes the rows of a Batch are split over


@flax.struct.dataclass
class Batch:
  """One RL update's data; B * G rows, the samples of prompt b at rows b*G .. b*G+G-1."""

  tokens: jax.Array  # int32 [BG, T]: left-padded prompt, then the completion
  token_mask: jax.Array  # bool [BG, T]: real tokens
  loss_mask: jax.Array  # bool [BG, T]: completion tokens to train on
  rewards: jax.Array  # float32 [B, G]
  truncated: jax.Array  # bool [BG]: hit the length limit without EOS
  experts: jax.Array | None = None  # int32 [L, BG, T, A]: rollout's expert choices
  # bool [BG, T]: completion tokens the sampler forced rather than sampled (the thinking budget's
  # </think>); in loss_mask, left out of the loss unless rl.loss_on_forced. None: none forced.
  forced: jax.Array | None = None
  # Width P of the left-padded prompt that the G rows of a group share (tokens[:, :P]); static.
  # `make_batch` sets it, and the update then runs each prompt once (`rl.share_prompt`); 0: the
  # rows are not known to share their prompts, every row runs in full.
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: update() calls so far
  params: Any
  opt_state: Any
  skipped: jax.Array  # int32: optimizer steps skipped for a non-finite loss or gradient


def make_batch(prompt_tokens_BP: jax.Array, prompt_mask_BP: jax.Array, rollout: Any,
               rewards_BG: jax.Array) -> Batch:
  """A Batch from left-padded prompts [B, P], a Rollout with B * G rows and rewards [B, G].

  prompt_mask_BP: bool [B, P] (True on real tokens), or int prompt lengths [B]. The rollout's
  `forced` mask (None: no token forced) becomes Batch.forced.
  """
  B, G = rewards_BG.shape
  P = prompt_tokens_BP.shape[1]
  if jnp.ndim(prompt_mask_BP) == 1:  # lengths of left-padded prompts
    prompt_mask_BP = jnp.arange(P)[None, :] >= P - jnp.asarray(prompt_mask_BP)[:, None]
  if rollout.tokens.shape[0] != B * G or prompt_tokens_BP.shape[0] != B:
    raise ValueError(f"rollout has {rollout.tokens.shape[0]} rows and prompts {prompt_tokens_BP.shape[0]};"
                     f" rewards [B={B}, G={G}] need B prompts and B * G rows.")
  repeat = lambda x: jnp.repeat(x, G, axis=0)
  prompt_mask = repeat(jnp.asarray(prompt_mask_BP, bool))
  completion_mask = jnp.asarray(rollout.mask, bool)
  forced = None
  if rollout.forced is not None:
    forced = jnp.concatenate([jnp.zeros_like(prompt_mask), jnp.asarray(rollout.forced, bool)], 1)
  return Batch(
      tokens=jnp.concatenate([repeat(jnp.asarray(prompt_tokens_BP, jnp.int32)),
                              jnp.asarray(rollout.tokens, jnp.int32)], axis=1),
      token_mask=jnp.concatenate([prompt_mask, completion_mask], axis=1),
      loss_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], axis=1),
      rewards=jnp.asarray(rewards_BG, jnp.float32),
      truncated=jnp.asarray(rollout.truncated, bool),
      experts=rollout.experts, forced=forced, prompt_len=P)


# ----------------------------------------------------------------------------- optimizer


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


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(params: Any, model_cfg: ModelConfig, tokens_BT: jax.Array,
                   token_mask_BT: jax.Array, *, temperature: float = 1.0, chunk: int = 128,
                   experts_LBTA: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
  """(logp_BT, entropy_BT, model Output) of every token given its prefix (module doc); the
  Output carries the MoE aux losses and the step classifier's logits.

  Logits / temperature are projected `chunk` time steps at a time inside a rematerialised
  lax.map, so at most [B, chunk, V] float32 logits are live, in the forward and backward pass.
  entropy_BT[:, t] is the entropy of the distribution tokens[t] was drawn from.
  """
  out = model.run(params, model_cfg, tokens_BT, token_mask_BT, experts_LBTA=experts_LBTA)
  B = tokens_BT.shape[0]
  logp_BT, entropy_BT = _next_token_logprobs(params, model_cfg, out.hidden, tokens_BT[:, 1:],
                                             temperature, chunk)
  first = lambda x: jnp.concatenate([jnp.zeros((B, 1), jnp.float32), x], axis=1)
  return first(logp_BT), first(entropy_BT), out


def shared_prompt_logprobs(params: Any, model_cfg: ModelConfig, tokens_BT: jax.Array,
                           token_mask_BT: jax.Array, *, group: int, prompt_len: int,
                           temperature: float = 1.0, chunk: int = 128,
                           experts_LBTA: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """`token_logprobs` for rows whose groups of `group` consecutive rows share their first
  `prompt_len` tokens (a left-padded prompt): each prompt runs once into a KV cache, which is
  copied to its rows, and only the completions run per row (the sampler's prefill, but
  differentiable: the copy's gradient sums the rows' contributions). The same values as
  `token_logprobs` on the completion tokens to float rounding, for (P + T_c) / (P / G + T_c)
  times fewer token FLOPs; log-probs and entropies of the prompt tokens are 0 (never trained
  on). Returns (logp_BT, entropy_BT, aux): the MoE aux losses of the whole batch, the prompt
  tokens counted once per row (`model.merge_aux`), as `token_logprobs` counts them.
  """
  BG, T = tokens_BT.shape
  G, P = group, prompt_len
  replay = lambda rows, times: None if experts_LBTA is None else experts_LBTA[:, rows, times]
  prompt = model.run(params, model_cfg, tokens_BT[::G, :P], token_mask_BT[::G, :P],
                     cache=model.init_cache(model_cfg, BG // G, T),
                     experts_LBTA=replay(slice(None, None, G), slice(None, P)), decoding=False)
  completion = model.run(params, model_cfg, tokens_BT[:, P:], token_mask_BT[:, P:],
                         cache=model.repeat_cache(prompt.cache, model_cfg, G),
                         experts_LBTA=replay(slice(None), slice(P, None)), decoding=False)
  # The prompt's last position predicts the first completion token, and so on.
  last = jax.tree.map(lambda x: jnp.repeat(x[:, -1:], G, axis=0), prompt.hidden)
  hidden = jax.tree.map(lambda a, b: jnp.concatenate([a, b[:, :-1]], axis=1), last,
                        completion.hidden)
  logp_BT, entropy_BT = _next_token_logprobs(params, model_cfg, hidden, tokens_BT[:, P:],
                                             temperature, chunk)
  prompt_zeros = lambda x: jnp.concatenate([jnp.zeros((BG, P), jnp.float32), x], axis=1)
  aux = model.merge_aux([(prompt.aux, G), (completion.aux, 1)])
  return prompt_zeros(logp_BT), prompt_zeros(entropy_BT), aux


def _next_token_logprobs(params: Any, model_cfg: ModelConfig, hidden: model.Hidden,
                         next_BT: jax.Array, temperature: float,
                         chunk: int) -> tuple[jax.Array, jax.Array]:
  """log pi(next_BT[:, t]) and the entropy of pi, from the hidden states at position t (the
  first next_BT.shape[1] positions of `hidden`), `chunk` positions at a time (token_logprobs)."""
  B, T = next_BT.shape
  c = min(chunk, T)
  n = -(-T // c)

  def to_chunks(x):  # [B, T, ...] -> [n, B, c, ...]
    x = jnp.pad(x[:, :T], [(0, 0), (0, n * c - T)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(B, n, c, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one_chunk(xs):
    hidden, next_Bc = xs
    logp_BcV = jax.nn.log_softmax(model.project(params, model_cfg, hidden) / temperature, axis=-1)
    logp_Bc = jnp.take_along_axis(logp_BcV, next_Bc[..., None], axis=-1)[..., 0]
    entropy_Bc = -jnp.sum(jnp.exp(logp_BcV) * logp_BcV, axis=-1)
    return logp_Bc, jax.lax.stop_gradient(entropy_Bc)

  logp_nBc, entropy_nBc = jax.lax.map(one_chunk, jax.tree.map(to_chunks, (hidden, next_BT)))
  from_chunks = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, n * c)[:, :T]
  return from_chunks(logp_nBc), from_chunks(entropy_nBc)


# ----------------------------------------------------------------------------- the update


@flax.struct.dataclass
class _Micro:
  """Rows of one micro-batch (leading axis M when stacked)."""

  tokens: jax.Array
  token_mask: jax.Array
  loss_mask: jax.Array
  adv: jax.Array  # float32 [rows]
  experts: jax.Array | None


def _split(x: jax.Array, M: int, axis: int = 0) -> jax.Array:
  """[.., BG, ..] -> [M, .., BG / M, ..]; micro-batch m gets rows m, m + M, ..."""
  shape = x.shape[:axis] + (x.shape[axis] // M, M) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def update_logprobs(params, model_cfg: ModelConfig, rl_cfg: RLConfig, tokens_BT: jax.Array,
                    token_mask_BT: jax.Array, *, share: tuple[int, int] | None,
                    experts_LBTA: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """(logp_BT, entropy_BT, MoE aux) of rows as the update computes them (rl_cfg's temperature
  and chunk); with `share` = (G, P) (`prompt_sharing`) each group of G rows runs its P-token
  prompt once (`shared_prompt_logprobs`)."""
  tokens_BT = sharding.constrain(tokens_BT, ("batch", "length"))
  kwargs = dict(temperature=rl_cfg.temperature, chunk=rl_cfg.logprob_chunk,
                experts_LBTA=experts_LBTA)
  if share:
    return shared_prompt_logprobs(params, model_cfg, tokens_BT, token_mask_BT, group=share[0],
                                  prompt_len=share[1], **kwargs)
  logp_BT, entropy_BT, out = token_logprobs(params, model_cfg, tokens_BT, token_mask_BT, **kwargs)
  return logp_BT, entropy_BT, out.aux


def _micro_loss(params, mb: _Micro, old_BT, ref_BT, denom, n_tokens, *, model_cfg: ModelConfig,
                rl_cfg: RLConfig, M: int, share: tuple[int, int] | None):
  """This micro-batch's share of the loss (its sums / the full batch's denominators)."""
  logp_BT, entropy_BT, aux = update_logprobs(
      params, model_cfg, rl_cfg, mb.tokens, mb.token_mask, share=share,
      experts_LBTA=mb.experts if rl_cfg.router_replay else None)
  mask_BT = mb.loss_mask
  old_BT = jax.lax.stop_gradient(logp_BT) if old_BT is None else old_BT
  log_r_BT = losses.log_ratio(logp_BT, old_BT, mask_BT, rl_cfg.importance_level)
  pg_BT, clipped_BT = losses.clipped_surrogate(log_r_BT, mb.adv, rl_cfg.eps_low, rl_cfg.eps_high)
  agg = lambda x: losses.aggregate_sum(x, mask_BT, rl_cfg.aggregation, rl_cfg.max_completion_len) / denom
  token_mean = lambda x: jnp.sum(jnp.where(mask_BT, x, 0.0)) / n_tokens
  m = {"pg_loss": agg(pg_BT),
       "load_balance_loss": aux["load_balance_loss"] / M, "z_loss": aux["z_loss"] / M,
       "expert_load": aux["expert_load"] / M, "entropy": token_mean(entropy_BT),
       "clip_frac": token_mean(clipped_BT.astype(jnp.float32)),
       "ratio_mean": token_mean(jax.lax.stop_gradient(jnp.exp(log_r_BT)))}
  loss = (m["pg_loss"] + model_cfg.load_balance_weight * m["load_balance_loss"]
          + model_cfg.z_loss_weight * m["z_loss"])
  if rl_cfg.beta > 0:
    m["kl"] = agg(losses.kl(logp_BT, ref_BT, old_BT, rl_cfg.kl_estimator))
    loss = loss + rl_cfg.beta * m["kl"]
  m["loss"] = loss
  return loss, m


def _accumulate(params, micro: _Micro, old_MBT, ref_MBT, denom, n_tokens, loss_fn):
  """Gradients and metrics summed over the micro-batches (lax.scan), float32 accumulators."""
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def body(acc, xs):
    mb, old_BT, ref_BT = xs
    grads, m = grad_fn(params, mb, old_BT, ref_BT, denom, n_tokens)
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, (grads, m)), None

  zero_m = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro),
                                          None if old_MBT is None else old_MBT[0],
                                          None if ref_MBT is None else ref_MBT[0],
                                          denom, n_tokens)[1])
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (params, zero_m))
  (grads, m), _ = jax.lax.scan(body, zeros, (micro, old_MBT, ref_MBT))
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), m


def merge_trainable(a: Any, b: Any) -> Any:
  """Leaves of `a`, with `b`'s where `a` holds None (same structure otherwise)."""
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def split_trainable(params: Any, trainable: Any) -> tuple[Any, Any]:
  """(trainable leaves with None for frozen ones, frozen leaves with None for trainable ones):
  differentiate the first, close over the second, `merge_trainable` them back."""
  train = jax.tree.map(lambda p, t: p if t else None, params, trainable)
  frozen = jax.tree.map(lambda p, t: None if t else p, params, trainable)
  return train, frozen


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


def _train_step(state: TrainState, batch: Batch, ref_params: Any, hp: dict[str, jax.Array], *,
                model_cfg: ModelConfig, rl_cfg: RLConfig, optimizer: optax.GradientTransformation,
                trainable: Any):
  """rl_cfg's RUNTIME_FIELDS are read from `hp`, never from rl_cfg (one program for all values)."""
  cfg, M = rl_cfg, rl_cfg.num_micro_batches
  B, G = batch.rewards.shape
  lengths_BG = batch.loss_mask.sum(-1).reshape(B, G)
  rewards_BG = batch.rewards
  metrics = {}
  if cfg.overlong_penalty:
    penalty_BG = losses.overlong_penalty(lengths_BG, cfg.max_completion_len, cfg.overlong_buffer,
                                         cfg.overlong_factor)
    if cfg.mask_truncated:  # rows without loss keep their raw reward in the baseline
      penalty_BG = jnp.where(batch.truncated.reshape(B, G), 0.0, penalty_BG)
    metrics["reward/overlong_penalty"] = penalty_BG.mean()
    rewards_BG = rewards_BG + penalty_BG
  adv_BG = advantages.compute(cfg.advantage, rewards_BG, tau=hp["tau"], scale=cfg.scale,
                              eps=cfg.eps)
  loss_mask = batch.loss_mask
  if cfg.mask_truncated:
    loss_mask = loss_mask & ~batch.truncated[:, None]
  if batch.forced is not None:
    metrics["completion/forced_frac"] = batch.forced.any(-1).mean(dtype=jnp.float32)
    if not cfg.loss_on_forced:
      loss_mask = loss_mask & ~batch.forced
  denom = jnp.maximum(losses.aggregate_denominator(loss_mask, cfg.aggregation), 1.0)
  n_tokens = jnp.maximum(loss_mask.sum(dtype=jnp.float32), 1.0)
  micro = _Micro(tokens=_split(batch.tokens, M), token_mask=_split(batch.token_mask, M),
                 loss_mask=_split(loss_mask, M), adv=_split(adv_BG.reshape(B * G), M),
                 experts=None if batch.experts is None else _split(batch.experts, M, axis=1))

  share = prompt_sharing(cfg, batch)

  def logprobs_per_micro(params, replay):
    return jax.lax.map(lambda mb: update_logprobs(
        params, model_cfg, cfg, mb.tokens, mb.token_mask, share=share,
        experts_LBTA=mb.experts if replay else None)[0], micro)

  # The reference policy routes by itself; the policy replays the rollout's experts if asked.
  ref_MBT = logprobs_per_micro(ref_params, False) if cfg.beta > 0 else None
  old_MBT = None
  if cfg.num_iterations > 1:
    old_MBT = jax.lax.stop_gradient(logprobs_per_micro(state.params, cfg.router_replay))

  def iteration(state, _):
    # Differentiate the trainable leaves only: frozen ones get no gradient accumulators.
    train, frozen = split_trainable(state.params, trainable)
    loss_fn = lambda train, *a: _micro_loss(merge_trainable(train, frozen), *a,
                                            model_cfg=model_cfg, rl_cfg=cfg, M=M,
                                            share=share)
    grads, m = _accumulate(train, micro, old_MBT, ref_MBT, denom, n_tokens, loss_fn)
    state, applied = apply_if_finite(state, grads, frozen, m["loss"], optimizer, hp)
    return state, {**m, **applied}

  state, iter_metrics = jax.lax.scan(iteration, state, None, length=cfg.num_iterations)
  metrics.update(jax.tree.map(lambda x: x[-1], iter_metrics))  # the last optimizer step's
  metrics.update(advantages.diagnostics(rewards_BG, adv_BG, hp["tau"]))  # the rewards A used
  metrics.update({
      "reward/mean": batch.rewards.mean(), "reward/std": batch.rewards.std(),  # raw rewards
      "adv/mean": adv_BG.mean(), "adv/std": adv_BG.std(),
      "completion/length_mean": lengths_BG.mean(dtype=jnp.float32),
      "completion/truncated_frac": batch.truncated.mean(dtype=jnp.float32),
      "skipped": state.skipped})
  return state.replace(step=state.step + 1), metrics


def prompt_sharing(rl_cfg: RLConfig, batch: Batch) -> tuple[int, int] | None:
  """`group_sharing` for the batch's group size and prompt width."""
  return group_sharing(rl_cfg, batch.rewards.shape[1], batch.prompt_len)


def group_sharing(rl_cfg: RLConfig, group: int, prompt_len: int) -> tuple[int, int] | None:
  """(rows per prompt in a micro-batch, prompt width) when the update runs each prompt once per
  micro-batch (`shared_prompt_logprobs`), else None. Micro-batch m holds samples m, m + M, ...
  of every group, so it holds G / M rows of each prompt (M must divide G: `make_update`)."""
  M = rl_cfg.num_micro_batches
  if not (rl_cfg.share_prompt and prompt_len and group % M == 0 and group // M > 1):
    return None
  return group // M, prompt_len


def check_layout(rl_cfg: RLConfig, B: int, G: int, prompt_len: int, mesh: Mesh | None) -> None:
  """Raises ValueError, naming the rl.* fields, unless B prompts x G samples split into
  rl_cfg.num_micro_batches micro-batches and over the mesh's BATCH_AXES devices (None: one
  device). The update checks every batch; the trainer checks its stages at start."""
  rows, M = B * G, rl_cfg.num_micro_batches
  row_devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)
  if rows % M or rows % row_devices:
    raise ValueError(f"Batch rows B*G={rows} must be divisible by rl.num_micro_batches={M} and "
                     f"by the {row_devices} devices of mesh axes {BATCH_AXES}; change the batch "
                     f"size, group size or mesh.")
  if rl_cfg.share_prompt and prompt_len and G % M:
    raise ValueError(f"rl.share_prompt=True runs each prompt once per micro-batch, which needs "
                     f"rl.num_micro_batches={M} to divide the group size G={G}; change either, "
                     f"or set rl.share_prompt=False.")
  if group_sharing(rl_cfg, G, prompt_len) and (rows // M) % row_devices:
    # Measured: data 2 x fsdp 2 x expert 2, 4 rows per micro-batch gave a wrong embedding
    # gradient (forward values exact; XLA's SPMD partitioner pads the rows).
    raise ValueError(f"rl.share_prompt=True needs each micro-batch's B*G/M={rows // M} rows to "
                     f"divide over the {row_devices} devices of mesh axes {BATCH_AXES}; use more "
                     f"prompts per step or fewer rl.num_micro_batches, or set "
                     f"rl.share_prompt=False.")


def batch_shardings(mesh: Mesh, with_experts: bool, prompt_len: int = 0,
                    with_forced: bool = False) -> Batch:
  """Rows over the BATCH_AXES mesh axes; rewards (tiny) replicated. As a jit in_sharding, a
  sharding for `forced` also serves batches whose `forced` is None."""
  rows = NamedSharding(mesh, P(BATCH_AXES))
  return Batch(tokens=rows, token_mask=rows, loss_mask=rows, rewards=sharding.replicated(mesh),
               truncated=rows,
               experts=NamedSharding(mesh, P(None, BATCH_AXES)) if with_experts else None,
               forced=rows if with_forced else None, prompt_len=prompt_len)


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


@functools.lru_cache(maxsize=32)
def _jitted_step(model_cfg: ModelConfig, program: RLConfig, mesh: Mesh | None,
                 optimizer: optax.GradientTransformation, train_step: Callable,
                 prompt_len: int = 0) -> Callable:
  """`train_step` (_train_step; tests wrap it) jitted, one per (model, program config, mesh,
  optimizer, Batch.prompt_len): a second stage or sweep run that differs only in run-time
  values reuses it without tracing again."""
  trainable = trainable_mask(program.freeze, model.abstract_params(model_cfg))
  step_fn = functools.partial(train_step, model_cfg=model_cfg, rl_cfg=program,
                              optimizer=optimizer, trainable=trainable)
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0)
  state_sh = state_shardings(model_cfg, optimizer, mesh)
  batch_sh = batch_shardings(mesh, program.router_replay, prompt_len, with_forced=True)
  ref_sh = model.param_shardings(model_cfg, mesh) if program.beta > 0 else None
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, ref_sh, sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def make_update(model_cfg: ModelConfig, rl_cfg: RLConfig, mesh: Mesh | None,
                optimizer: optax.GradientTransformation | None = None
                ) -> Callable[..., tuple[TrainState, dict]]:
  """`update(state, batch, ref_params=None) -> (state, metrics)`, jitted once (module doc).

  `state` is donated. `ref_params` (the frozen reference policy, laid out like the parameters)
  is required when rl_cfg.beta > 0 and ignored otherwise. Batch rows must divide into
  num_micro_batches and over the mesh's data * fsdp * expert devices. metrics: replicated
  float32 scalars (expert_load [L + L_think, E]). `update.lower(state, batch, ref_params)`
  returns the jitted step lowered for those arguments (benchmarks read its cost and memory).

  optimizer: None for `program_optimizer(model_cfg, rl_cfg)`. The jitted step is shared by
  updates with the same program config and optimizer object: the trainer's rl and specialize
  stages trace and compile it once.
  """
  optimizer = program_optimizer(model_cfg, rl_cfg) if optimizer is None else optimizer
  jitted = functools.partial(_jitted_step, model_cfg, program_config(rl_cfg), mesh, optimizer,
                             _train_step)  # called with Batch.prompt_len

  def prepare(state: TrainState, batch: Batch, ref_params: Any):
    rows = batch.tokens.shape[0]
    B, G = batch.rewards.shape
    if rows != B * G:
      raise ValueError(f"Batch has {rows} rows but rewards are [B={B}, G={G}].")
    check_layout(rl_cfg, B, G, batch.prompt_len, mesh)
    if rl_cfg.router_replay and batch.experts is None:
      raise ValueError("rl.router_replay=True needs Batch.experts (the rollout's expert choices).")
    if rl_cfg.beta > 0 and ref_params is None:
      raise ValueError(f"rl.beta={rl_cfg.beta} > 0 needs ref_params (the reference policy).")
    if not rl_cfg.router_replay:
      batch = batch.replace(experts=None)
    ref_params = ref_params if rl_cfg.beta > 0 else None
    if mesh is not None:
      batch = jax.device_put(batch, batch_shardings(mesh, rl_cfg.router_replay, batch.prompt_len,
                                                    with_forced=batch.forced is not None))
    return state, batch, ref_params, hp

  hp = hyperparams(rl_cfg)
  in_mesh = lambda: contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)

  def update(state: TrainState, batch: Batch, ref_params: Any = None):
    with in_mesh():
      return jitted(batch.prompt_len)(*prepare(state, batch, ref_params))

  def lower(state: TrainState, batch: Batch, ref_params: Any = None) -> jax.stages.Lowered:
    """The jitted step lowered for these arguments (for cost and memory analysis)."""
    with in_mesh():
      return jitted(batch.prompt_len).lower(*prepare(state, batch, ref_params))

  update.lower = lower
  update.jitted = jitted  # jitted(prompt_len): for lowering with abstract, pre-sharded arguments
  return update
