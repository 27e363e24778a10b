"""The supervised step: next-token cross-entropy on trace and/or answer tokens, plus the thinking
head's step-type classifier. With `freeze=("base",)` it is the recipe's thinking-head
pre-training (the base model frozen); without, a full supervised warm start.

Loss = sum over target tokens of -log p(token) / #targets
       + step_loss_weight * mean over trace tokens of CE(step classifier, step label)
       + MoE auxiliary losses (model config weights).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig
from corpo_jax.sharding import BATCH_AXES
from corpo_jax.train.logprobs import token_logprobs
from corpo_jax.train.optim import apply_if_finite, hyperparams
from corpo_jax.train.state import (TrainState, merge_trainable, split_trainable, state_shardings,
                                   trainable_mask)

LOSS_TARGETS = ("trace", "answer")


@flax.struct.dataclass
class SftBatch:
  """Right-padded sequences (corpo_jax/data/pipeline.py sft_sequences), rows [B, T]."""

  tokens: jax.Array
  token_mask: jax.Array
  trace_mask: jax.Array
  answer_mask: jax.Array
  step_labels: jax.Array

  @classmethod
  def from_numpy(cls, batch: dict) -> "SftBatch":
    return cls(**{f: jnp.asarray(batch[f]) for f in
                  ("tokens", "token_mask", "trace_mask", "answer_mask", "step_labels")})


def check_loss_on(loss_on: Sequence[str]) -> tuple[str, ...]:
  loss_on = tuple(loss_on)
  if not loss_on or any(t not in LOSS_TARGETS for t in loss_on):
    raise ValueError(f"sft.loss_on={loss_on} must be a non-empty subset of {LOSS_TARGETS}.")
  return loss_on


def sft_loss(params: Any, batch: SftBatch, *, cfg: ModelConfig, loss_on: tuple[str, ...],
             step_loss_weight: float, chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  logp_BT, _, out = token_logprobs(params, cfg, batch.tokens, batch.token_mask, chunk=chunk)
  target_BT = jnp.zeros_like(batch.token_mask)
  for name in loss_on:
    target_BT |= batch.trace_mask if name == "trace" else batch.answer_mask
  n_targets = jnp.maximum(target_BT.sum(dtype=jnp.float32), 1.0)
  nll = -jnp.sum(jnp.where(target_BT, logp_BT, 0.0)) / n_targets
  loss = nll + cfg.load_balance_weight * out.aux["load_balance_loss"] + (
      cfg.z_loss_weight * out.aux["z_loss"])
  metrics = {"nll": nll, "aux/load_balance_loss": out.aux["load_balance_loss"],
             "aux/z_loss": out.aux["z_loss"]}
  if cfg.has_thinking_head and step_loss_weight > 0:
    logp_BTC = jax.nn.log_softmax(out.step_logits_BTC, axis=-1)
    ce_BT = -jnp.take_along_axis(logp_BTC, batch.step_labels[..., None], axis=-1)[..., 0]
    n_trace = jnp.maximum(batch.trace_mask.sum(dtype=jnp.float32), 1.0)
    step_ce = jnp.sum(jnp.where(batch.trace_mask, ce_BT, 0.0)) / n_trace
    loss = loss + step_loss_weight * step_ce
    metrics["step_ce"] = step_ce
  metrics["loss"] = loss
  return loss, metrics


def _sft_step(state: TrainState, batch: SftBatch, hp: dict[str, jax.Array], *, loss_fn, optimizer,
              trainable):
  train, frozen = split_trainable(state.params, trainable)  # no gradients for frozen leaves
  (_, metrics), grads = jax.value_and_grad(
      lambda t: loss_fn(merge_trainable(t, frozen), batch), has_aux=True)(train)
  state, applied = apply_if_finite(state, grads, frozen, metrics["loss"], optimizer, hp)
  return state.replace(step=state.step + 1), {**metrics, **applied, "skipped": state.skipped}


def make_sft_update(cfg: ModelConfig, opt_cfg: RLConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, loss_on: Sequence[str], step_loss_weight: float,
                    chunk: int = 128) -> Callable:
  """`update(state, batch: SftBatch) -> (state, metrics)`, jitted once with explicit shardings,
  state donated; non-finite steps are skipped and counted as in the RL update. opt_cfg: the
  optimizer's RLConfig (its freeze patterns, and its schedule as run-time values)."""
  loss_fn = functools.partial(sft_loss, cfg=cfg, loss_on=check_loss_on(loss_on),
                              step_loss_weight=step_loss_weight, chunk=chunk)
  step = functools.partial(_sft_step, loss_fn=loss_fn, optimizer=optimizer,
                           trainable=trainable_mask(opt_cfg.freeze, model.abstract_params(cfg)))
  state_sh = state_shardings(cfg, optimizer, mesh)
  rows = NamedSharding(mesh, P(BATCH_AXES))
  batch_sh = SftBatch(rows, rows, rows, rows, rows)
  hp = hyperparams(opt_cfg)
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)

  def update(state: TrainState, batch: SftBatch):
    with jax.set_mesh(mesh):
      return jitted(state, jax.device_put(batch, batch_sh), hp)

  return update
