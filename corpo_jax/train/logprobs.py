"""Per-token log-probs of sequences under a policy, shared by the SFT and RL steps.

Log-probs live in "token space": logp_BT[:, t] = log pi(tokens[t] | tokens[:t]) (from the
logits at t - 1; 0 at t = 0), aligned with the batch's loss masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from corpo_jax import model
from corpo_jax.model import ModelConfig


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
