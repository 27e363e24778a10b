"""The RL update: a pure, jitted step from a rollout batch to new parameters.

`update = make_update(model_cfg, rl_cfg, mesh[, optimizer])` compiles once (explicit in/out
shardings, donated state) a function

    update(state: TrainState, batch: Batch, ref_params=None) -> (state, metrics)

(tau and the optimizer schedule, rl_cfg's RUNTIME_FIELDS in corpo_jax/train/optim.py, are
run-time inputs, not constants) that, for `rl_cfg.num_iterations` optimizer steps on the same
batch: computes advantages from the rewards (plus the overlong penalty), the policy's log-probs
of the completion tokens (logits / temperature projected chunk by chunk over time, so [B, T, V]
is never live), the PPO/GSPO surrogate, beta * KL against `ref_params` (needed only when
beta > 0), the MoE auxiliary losses, and gradients accumulated over micro-batches as an exact
weighted mean. The loss and KL cover the sampled completion tokens only: tokens the sampler
forced (Batch.forced) are left out unless rl.loss_on_forced (docs/algorithms.md). A step whose
loss or gradients are not finite is skipped (`apply_if_finite`): parameters and optimizer state
stay as they were and `state.skipped` counts it. Nothing is random, so no rng is taken. The
state, its shardings and the freeze mask are corpo_jax/train/state.py's.

Log-probs are in "token space" (corpo_jax/train/logprobs.py), aligned with Batch.loss_mask.
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
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl import advantages, losses
from corpo_jax.rl.config import RLConfig
from corpo_jax.sharding import BATCH_AXES
from corpo_jax.train.logprobs import shared_prompt_logprobs, token_logprobs
from corpo_jax.train.optim import apply_if_finite, hyperparams, program_config, program_optimizer
from corpo_jax.train.state import (TrainState, merge_trainable, split_trainable, state_shardings,
                                   trainable_mask)


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
