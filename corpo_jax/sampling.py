"""Rollouts: prefill each prompt once, copy its KV cache to G samples, decode in a jitted loop.

`generate` returns a `Rollout` (see /work/brief/contract.md): completion tokens, mask, log-probs
of the sampled tokens under the distribution actually sampled from, lengths, truncation flags,
the base layers' expert choices for router replay, and which tokens were forced.

Sampling strategies are small frozen dataclasses applied to float32 logits in the order given:
`Temperature(t)`, `TopK(k)`, `TopP(p)` (e.g. `(Temperature(0.7), TopK(50), TopP(0.95))`), or
`Greedy()` alone. Log-probs are log-softmax of the transformed logits at the sampled token; for
`Greedy` they are those of the untransformed (temperature 1) distribution.

Think spans: the cache tracks whether a span is open, so `model.run`/`model.project` use the
thinking head's logits inside spans exactly as the training forward pass does. With
`max_thinking_tokens = n`, once n tokens have been generated inside an open span, `</think>` is
forced (its log-prob is taken under the temperature-scaled, untruncated distribution, as the RL
update computes it) and marked in `Rollout.forced`: the policy never sampled it, so the RL update
leaves it out of the loss. Tokens of a span opened in the prompt count from the first generated
one.

Static shapes and buckets (one compilation per bucket): the prompt width is left-padded up to
`bucket(P)` and the completion buffer is `bucket(max_new_tokens)` long, where `bucket(n)` is the
next power of two >= max(n, 16). `max_new_tokens`, `eos_id` and `max_thinking_tokens` are traced
values, so any lengths in one bucket share one executable; the loop stops after
`max_new_tokens` steps or when every row has finished. The batch size, `num_samples`, the
strategy and the model config are static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp

from corpo_jax import model
from corpo_jax.model import ModelConfig
from corpo_jax.sharding import constrain

_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax decoding (must be the only strategy)."""


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"Temperature({self.temperature}): must be > 0; use Greedy() for argmax.")

  def __call__(self, logits_BV: jax.Array) -> jax.Array:
    return logits_BV / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"TopK({self.k}): k must be >= 1.")

  def __call__(self, logits_BV: jax.Array) -> jax.Array:
    kth_B1 = jax.lax.top_k(logits_BV, min(self.k, logits_BV.shape[-1]))[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: keeps the smallest set of most likely tokens whose mass reaches p (ties
  with the least likely kept token are kept too)."""

  p: float

  def __post_init__(self):
    if not 0 < self.p <= 1:
      raise ValueError(f"TopP({self.p}): p must be in (0, 1].")

  def __call__(self, logits_BV: jax.Array) -> jax.Array:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    kept_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < self.p, axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


Strategy = Greedy | Temperature | TopK | TopP


def strategy(temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[Strategy, ...]:
  """The strategy of a config's sampling fields: greedy at temperature 0, else the temperature
  with top-k (0: off) and top-p (1: off) filters."""
  if temperature == 0:
    return (Greedy(),)
  out = [Temperature(temperature)]
  if top_k:
    out.append(TopK(top_k))
  if top_p < 1.0:
    out.append(TopP(top_p))
  return tuple(out)


@flax.struct.dataclass
class Rollout:
  """G samples per prompt; the samples of prompt b are rows b*G .. b*G+G-1 in sampling order."""

  tokens: jax.Array  # int32 [BG, T_c]; pad_id after EOS
  mask: jax.Array  # bool [BG, T_c]; generated tokens up to and including EOS
  logprobs: jax.Array  # float32 [BG, T_c]; 0 where mask is False
  lengths: jax.Array  # int32 [BG]
  truncated: jax.Array  # bool [BG]: max_new_tokens reached without EOS
  experts: jax.Array  # int32 [L, BG, P + T_c, A]: base layers' expert choices (router replay)
  forced: jax.Array | None = None  # bool [BG, T_c]: forced by the thinking budget, not sampled


@flax.struct.dataclass
class _State:
  """The decode loop's carry."""

  step: jax.Array  # int32 scalar: tokens generated so far
  rng: jax.Array
  logits_BV: jax.Array  # float32 logits for the next token
  cache: model.Cache
  tokens_BT: jax.Array
  logprobs_BT: jax.Array
  forced_BT: jax.Array
  experts_LBTA: jax.Array
  done_B: jax.Array
  think_count_B: jax.Array  # tokens generated inside the currently open think span


def bucket(n: int) -> int:
  """The static length used for n tokens: next power of two >= max(n, 16)."""
  return max(_MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _check_strategy(strategy: Sequence[Strategy]) -> tuple[Strategy, ...]:
  strategy = tuple(strategy)
  if not strategy:
    raise ValueError("strategy is empty; pass Greedy() or e.g. (Temperature(1.0),).")
  if any(isinstance(s, Greedy) for s in strategy) and len(strategy) > 1:
    raise ValueError(f"strategy={strategy}: Greedy() cannot be combined with other strategies.")
  for s in strategy:
    if not isinstance(s, (Greedy, Temperature, TopK, TopP)):
      raise ValueError(f"Unknown sampling strategy {s!r}; use Greedy, Temperature, TopK, TopP.")
  return strategy


def _sample(rng: jax.Array, logits_BV: jax.Array,
            strategy: tuple[Strategy, ...]) -> tuple[jax.Array, jax.Array]:
  """Next tokens [B] and their log-probs under the distribution sampled from."""
  if isinstance(strategy[0], Greedy):
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  else:
    for transform in strategy:
      logits_BV = transform(logits_BV)
    token_B = jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def _temperature(strategy: tuple[Strategy, ...]) -> float:
  t = 1.0
  for s in strategy:
    if isinstance(s, Temperature):
      t *= s.temperature
  return t


def _split_layers(params: Any) -> Any:
  """Stacked layer weights [L, ...] as tuples of L per-layer arrays (see `_stack_layers`)."""
  def split(tree):
    return jax.tree.map(lambda w: tuple(w[i] for i in range(w.shape[0])), tree)
  params = dict(params, layers=split(params["layers"]))
  if "thinking" in params:
    params["thinking"] = dict(params["thinking"], layers=split(params["thinking"]["layers"]))
  return params


def _stack_layers(params: Any) -> Any:
  """Inverse of `_split_layers`. Inside the decode loop this lets XLA simplify the unrolled
  layer stack's slice(stack(w_0 .. w_L)) to w_i, so no step copies the weights."""
  is_split = lambda x: isinstance(x, tuple)
  stack = lambda tree: jax.tree.map(jnp.stack, tree, is_leaf=is_split)
  params = dict(params, layers=stack(params["layers"]))
  if "thinking" in params:
    params["thinking"] = dict(params["thinking"], layers=stack(params["thinking"]["layers"]))
  return params


def _prefill(params, cfg: ModelConfig, prompts_BP, prompt_mask_BP, num_samples: int, size: int):
  cache = model.init_cache(cfg, prompts_BP.shape[0], size)
  out = model.run(params, cfg, prompts_BP, prompt_mask_BP, cache=cache)
  last = jax.tree.map(lambda x: x[:, -1:], out.hidden)
  logits_BV = model.project(params, cfg, last)[:, 0]
  rep = lambda x: jnp.repeat(x, num_samples, axis=0)
  experts_LBPA = jnp.repeat(out.experts_LBTA, num_samples, axis=1)
  return rep(logits_BV), model.repeat_cache(out.cache, cfg, num_samples), experts_LBPA


def _decode_step(params, cfg: ModelConfig, strategy, state: _State, eos_id, max_new_tokens,
                 max_thinking_tokens) -> _State:
  rng = jax.random.fold_in(state.rng, state.step)
  token_B, logp_B = _sample(rng, state.logits_BV, strategy)
  force_B = jnp.zeros_like(state.done_B)
  if cfg.has_thinking_head and cfg.think_end_id >= 0:
    force_B = state.cache.think_open_B & (state.think_count_B >= max_thinking_tokens)
    forced_logp_B = jax.nn.log_softmax(state.logits_BV / _temperature(strategy))[:, cfg.think_end_id]
    token_B = jnp.where(force_B, cfg.think_end_id, token_B)
    logp_B = jnp.where(force_B, forced_logp_B, logp_B)
  live_B = ~state.done_B
  force_B = force_B & live_B
  token_B = jnp.where(live_B, token_B, cfg.pad_id)
  logp_B = jnp.where(live_B, logp_B, 0.0)

  out = model.run(params, cfg, token_B[:, None], live_B[:, None], cache=state.cache)
  logits_BV = model.project(params, cfg, out.hidden)[:, 0]
  inside_B = state.cache.think_open_B & live_B & out.cache.think_open_B
  think_count_B = jnp.where(out.cache.think_open_B, state.think_count_B + inside_B, 0)
  done_B = state.done_B | (token_B == eos_id) | (state.step + 1 >= max_new_tokens)
  at = (0, state.step)
  return _State(
      step=state.step + 1, rng=state.rng, logits_BV=logits_BV, cache=out.cache,
      tokens_BT=jax.lax.dynamic_update_slice(state.tokens_BT, token_B[:, None], at),
      logprobs_BT=jax.lax.dynamic_update_slice(state.logprobs_BT, logp_B[:, None], at),
      forced_BT=jax.lax.dynamic_update_slice(state.forced_BT, force_B[:, None], at),
      experts_LBTA=jax.lax.dynamic_update_slice(state.experts_LBTA, out.experts_LBTA,
                                                (0, 0, state.step, 0)),
      done_B=done_B, think_count_B=think_count_B)


def _generate(params, prompts_BP, prompt_mask_BP, rng, eos_id, max_new_tokens,
              max_thinking_tokens, *, cfg: ModelConfig, strategy, num_samples: int,
              completion_size: int):
  B, P = prompts_BP.shape
  BG = B * num_samples
  logits_BV, cache, experts_LBPA = _prefill(params, cfg, prompts_BP, prompt_mask_BP, num_samples,
                                            P + completion_size)
  L, A = experts_LBPA.shape[0], experts_LBPA.shape[-1]
  batch = lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  state = _State(
      step=jnp.zeros((), jnp.int32), rng=rng, logits_BV=batch(logits_BV), cache=cache,
      tokens_BT=batch(jnp.full((BG, completion_size), cfg.pad_id, jnp.int32)),
      logprobs_BT=batch(jnp.zeros((BG, completion_size), jnp.float32)),
      forced_BT=batch(jnp.zeros((BG, completion_size), bool)),
      experts_LBTA=constrain(jnp.zeros((L, BG, completion_size, A), jnp.int32),
                             (None, "batch", None, None)),
      done_B=batch(jnp.zeros((BG,), bool)),
      think_count_B=batch(jnp.zeros((BG,), jnp.int32)))
  split_params = _split_layers(params)
  state = jax.lax.while_loop(
      lambda s: ~jnp.all(s.done_B),
      lambda s: _decode_step(_stack_layers(split_params), cfg, strategy, s, eos_id,
                             max_new_tokens, max_thinking_tokens), state)

  t_T = jnp.arange(completion_size)
  eos_BT = (state.tokens_BT == eos_id) & (t_T < state.step)
  has_eos_B = jnp.any(eos_BT, axis=1)
  lengths_B = jnp.where(has_eos_B, jnp.argmax(eos_BT, axis=1) + 1,
                        jnp.minimum(state.step, max_new_tokens)).astype(jnp.int32)
  mask_BT = t_T < lengths_B[:, None]
  return Rollout(tokens=jnp.where(mask_BT, state.tokens_BT, cfg.pad_id), mask=mask_BT,
                 logprobs=jnp.where(mask_BT, state.logprobs_BT, 0.0), lengths=lengths_B,
                 truncated=~has_eos_B,
                 experts=jnp.concatenate([experts_LBPA, state.experts_LBTA], axis=2),
                 forced=state.forced_BT & mask_BT)


# No YNNPACK fusions in the sampler on XLA:CPU (other backends ignore this option): its
# reductions ran the decode attention's multiply-reduce over the cache ~2x slower than XLA's own
# loops, and its dots repack the weights on every small decode matmul: on an AVX2 VM,
# `generate` at the reference config took 1.14 s without YNNPACK against 1.47 s with its dots
# (8 interleaved runs each, every run without faster; docs/benchmarks.md "Session 10").
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _jitted(backend: str):
  return jax.jit(_generate, static_argnames=("cfg", "strategy", "num_samples", "completion_size"),
                 compiler_options=_CPU_OPTIONS if backend == "cpu" else None)


def generate(params: Any, cfg: ModelConfig, prompts_BP: jax.Array, prompt_mask_BP: jax.Array, *,
             rng: jax.Array, num_samples: int, max_new_tokens: int,
             strategy: Strategy | Sequence[Strategy] = (Temperature(1.0),), eos_id: int = -1,
             max_thinking_tokens: int | None = None) -> Rollout:
  """Samples `num_samples` completions of up to `max_new_tokens` tokens for each prompt.

  prompts_BP: int32 [B, P] LEFT-padded prompts; prompt_mask_BP: bool [B, P], True on real
  tokens (every prompt needs at least one). eos_id: a row stops after generating it (-1: never).
  Under `with jax.set_mesh(mesh)` the batch is sharded over (data, fsdp, expert) and the cache
  as `model.cache_logical_axes`; params are used in whatever sharding they come in.
  Returns a Rollout with T_c = max_new_tokens and experts over the P + T_c positions.
  """
  strategy = _check_strategy(strategy if isinstance(strategy, Sequence) else (strategy,))
  B, P = prompts_BP.shape
  if max_new_tokens < 1 or num_samples < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}, num_samples={num_samples}: both must be "
                     f">= 1.")
  P_pad, T_pad = bucket(P), bucket(max_new_tokens)
  if P_pad + T_pad > cfg.max_seq_len:
    raise ValueError(f"prompt bucket {P_pad} + completion bucket {T_pad} exceeds "
                     f"max_seq_len={cfg.max_seq_len}; shorten prompts or max_new_tokens.")
  prompts_BP = jnp.pad(jnp.asarray(prompts_BP, jnp.int32), ((0, 0), (P_pad - P, 0)),
                       constant_values=cfg.pad_id)
  prompt_mask_BP = jnp.pad(jnp.asarray(prompt_mask_BP, bool), ((0, 0), (P_pad - P, 0)))
  budget = jnp.iinfo(jnp.int32).max if max_thinking_tokens is None else max_thinking_tokens
  out = _jitted(jax.default_backend())(params, prompts_BP, prompt_mask_BP, rng, jnp.int32(eos_id),
                      jnp.int32(max_new_tokens), jnp.int32(budget), cfg=cfg, strategy=strategy,
                      num_samples=num_samples, completion_size=T_pad)
  if (P_pad, T_pad) == (P, max_new_tokens):
    return out
  cut = lambda x: x[:, :max_new_tokens]
  return Rollout(tokens=cut(out.tokens), mask=cut(out.mask), logprobs=cut(out.logprobs),
                 lengths=out.lengths, truncated=out.truncated,
                 experts=out.experts[:, :, P_pad - P:P_pad + max_new_tokens],
                 forced=cut(out.forced))
