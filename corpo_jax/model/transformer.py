"""The Mixtral decoder, the thinking head, the KV cache and the pure entry points.

Think spans. Logits at position t produce token t+1. The thinking head produces every token from
the one after `<think>` up to and including `</think>`: it is used at input positions where a
think span is open after reading token t (`think_mask`). All other positions use the base head.
With `thinking_layers = 0` the model is a plain Mixtral and thinking is just tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from corpo_jax import sharding
from corpo_jax.model import moe
from corpo_jax.model.config import ModelConfig
from corpo_jax.model.layers import Attention, RMSNorm, fan_in_init, param
from corpo_jax.sharding import constrain

_policies = jax.checkpoint_policies
_EXPERTS = _policies.save_only_these_names(*moe.EXPERT_MATMULS)
# What a rematerialised layer keeps for the backward pass (the rest is recomputed): "full"
# nothing; "dots" the unbatched matmuls (attention and router projections; the experts' batched
# [E, C, .] matmuls are recomputed); "experts" only the expert matmuls (by their checkpoint_name,
# moe.EXPERT_MATMULS; capacity and expert_parallel dispatch); "dots_and_experts" both.
_REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.checkpoint_dots_with_no_batch_dims,
    "experts": _EXPERTS,
    "dots_and_experts": _policies.save_from_both_policies(
        _policies.checkpoint_dots_with_no_batch_dims, _EXPERTS),
}


class Block(nn.Module):
  """One decoder layer: x + attn(norm(x)), then x + moe(norm(x)). Scanned over layers."""

  cfg: ModelConfig
  decoding: bool = False  # a sampler pass (see `run`)

  @nn.compact
  def __call__(self, x_BTD, layer_in, pos_BT, mask_BTS, token_mask_BT, write_index):
    cache = None if layer_in["k"] is None else {"k": layer_in["k"], "v": layer_in["v"]}
    new_cache, h_BTD = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BTD), pos_BT, mask_BTS, cache, write_index)
    x_BTD = x_BTD + h_BTD
    h_BTD, experts_BTA = moe.MoE(self.cfg, name="moe")(
        RMSNorm(self.cfg, name="moe_norm")(x_BTD), token_mask_BT, layer_in["experts"],
        decoding=self.decoding)
    x_BTD = constrain(x_BTD + h_BTD, ("batch", "length", "act_embed"))
    new_cache = new_cache or {"k": None, "v": None}
    return x_BTD, {**new_cache, "experts": experts_BTA}


def _stack(cfg: ModelConfig, length: int, name: str, decoding: bool) -> nn.Module:
  """The scanned layers; unrolled when decoding, so that each layer reads its weights in place
  instead of the scan copying a dynamic slice of the stacked weights every step."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True}, in_axes=(0,) + (nn.broadcast,) * 4,
                 length=length, unroll=length if decoding else 1,
                 metadata_params={nn.PARTITION_NAME: "layers"})(cfg, decoding, name=name)


@flax.struct.dataclass
class Hidden:
  """Final-normed hidden states of both heads; `project` turns them into logits."""

  base_BTD: jax.Array
  think_BTD: jax.Array | None  # None without a thinking head
  think_mask_BT: jax.Array  # True where the thinking head's logits are used


@flax.struct.dataclass
class Cache:
  """Decoding state for B rows and S slots; slot s of every row is written at the same step."""

  k: tuple[jax.Array, ...]  # L arrays [B, K, S, H], one per layer (see `init_cache`)
  v: tuple[jax.Array, ...]
  think_k: tuple[jax.Array, ...] | None  # L_think arrays [B, K, S, H]
  think_v: tuple[jax.Array, ...] | None
  valid_BS: jax.Array  # slots holding real (non-padding) tokens
  end: jax.Array  # int32 scalar: next slot to write
  next_pos_B: jax.Array  # int32: rotary position of each row's next real token
  think_open_B: jax.Array  # bool: a think span is open after the last token

  @property
  def size(self) -> int:
    return self.valid_BS.shape[1]


@flax.struct.dataclass
class Output:
  hidden: Hidden
  cache: Cache | None
  experts_LBTA: jax.Array  # base layers' chosen experts (router replay)
  step_logits_BTC: jax.Array | None  # thinking head's step-type classifier (float32)
  aux: dict[str, Any]  # load_balance_loss, z_loss (means over all MoE layers, base then
  # thinking head), expert_load [L + L_think, E], stats (per layer; see `merge_aux`)


class Transformer(nn.Module):
  cfg: ModelConfig
  decoding: bool = False  # a sampler pass (see `run`)

  @nn.compact
  def __call__(self, tokens_BT, pos_BT, mask_BTS, token_mask_BT, think_mask_BT, write_index,
               cache_in: dict[str, Any], experts_LBTA=None):
    cfg = self.cfg
    embed_VD = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                     nn.initializers.normal(1.0), cfg)
    if not cfg.tie_embeddings:
      param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), fan_in_init(0, 1), cfg)
    x_BTD = constrain(embed_VD.astype(cfg.dtype)[tokens_BT], ("batch", "length", "act_embed"))
    args = (pos_BT, mask_BTS, token_mask_BT, write_index)
    x_BTD, base_out = _stack(cfg, cfg.num_layers, "layers", self.decoding)(
        x_BTD, {"k": cache_in["k"], "v": cache_in["v"], "experts": experts_LBTA}, *args)
    hidden = Hidden(RMSNorm(cfg, name="final_norm")(x_BTD), None, think_mask_BT)
    step_logits, think_out = None, {"k": None, "v": None}
    if cfg.has_thinking_head:
      h_think, step_logits, think_out = ThinkingHead(cfg, self.decoding, name="thinking")(
          x_BTD, {"k": cache_in["think_k"], "v": cache_in["think_v"]}, *args)
      hidden = dataclasses.replace(hidden, think_BTD=h_think)
    return hidden, base_out, think_out, step_logits


class ThinkingHead(nn.Module):
  """Extra decoder layers over the base's final residual stream, own final norm, optional own
  unembedding (declared here, used by `project`) and a step-type classifier."""

  cfg: ModelConfig
  decoding: bool = False

  @nn.compact
  def __call__(self, x_BTD, cache_in, pos_BT, mask_BTS, token_mask_BT, write_index):
    cfg = self.cfg
    if not cfg.thinking_shared_unembed:
      param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), fan_in_init(0, 1), cfg)
    x_BTD, out = _stack(cfg, cfg.thinking_layers, "layers", self.decoding)(
        x_BTD, {**cache_in, "experts": None}, pos_BT, mask_BTS, token_mask_BT, write_index)
    h_BTD = RMSNorm(cfg, name="norm")(x_BTD)
    w_DC = param(self, "step_head", (cfg.d_model, cfg.num_step_classes), ("embed", "classes"),
                 fan_in_init(0, 1), cfg)
    step_logits = jnp.einsum("BTD,DC->BTC", h_BTD.astype(jnp.float32), w_DC.astype(jnp.float32))
    return h_BTD, step_logits, out


# ----------------------------------------------------------------------------- pure functions


def think_mask(tokens_BT: jax.Array, token_mask_BT: jax.Array, cfg: ModelConfig,
               open_at_start_B: jax.Array | None = None) -> jax.Array:
  """True at positions after which a think span is open (see module docstring)."""
  B, T = tokens_BT.shape
  if not cfg.has_thinking_head or cfg.think_start_id < 0:
    return jnp.zeros((B, T), bool)
  t_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  opened = jnp.where((tokens_BT == cfg.think_start_id) & token_mask_BT, t_BT, -3)
  closed = jnp.where((tokens_BT == cfg.think_end_id) & token_mask_BT, t_BT, -2)
  if open_at_start_B is not None:  # a span carried in open counts as opened at t = -1
    opened = jnp.maximum(opened, jnp.where(open_at_start_B, -1, -3)[:, None])
  return jax.lax.cummax(opened, axis=1) > jax.lax.cummax(closed, axis=1)


def init_cache(cfg: ModelConfig, batch: int, size: int) -> Cache:
  """An empty cache of `size` slots per row (size <= cfg.max_seq_len).

  Keys and values are one [B, K, S, H] array per layer, not one stacked [L, ...] array: in a
  decode loop's carry each layer's buffer is then read by its attention and written in place,
  where slicing a stacked buffer per layer made XLA copy it (measured: two copies of the whole
  cache plus a slice copy per layer each step). [B, K, S, H] makes the cached attention a
  batched matmul over (B, K) with no transpose of the cache.
  """
  if size > cfg.max_seq_len:
    raise ValueError(f"KV cache of {size} slots exceeds model.max_seq_len={cfg.max_seq_len}.")
  kv = lambda L: tuple(jnp.zeros((batch, cfg.num_kv_heads, size, cfg.head_dim), cfg.dtype)
                       for _ in range(L))
  think = cfg.has_thinking_head
  return Cache(k=kv(cfg.num_layers), v=kv(cfg.num_layers),
               think_k=kv(cfg.thinking_layers) if think else None,
               think_v=kv(cfg.thinking_layers) if think else None,
               valid_BS=jnp.zeros((batch, size), bool), end=jnp.zeros((), jnp.int32),
               next_pos_B=jnp.zeros((batch,), jnp.int32), think_open_B=jnp.zeros((batch,), bool))


def repeat_cache(cache: Cache, cfg: ModelConfig, G: int) -> Cache:
  """Each row's cache copied to G consecutive rows (row b to rows b*G .. b*G+G-1)."""
  def rep(x, names):
    if names is None or "batch" not in names:
      return x
    return constrain(jnp.repeat(x, G, axis=names.index("batch")), names)
  return jax.tree.map(rep, cache, cache_logical_axes(cfg))


def cache_logical_axes(cfg: ModelConfig) -> Cache:
  """Logical axis names of every Cache field (for shardings)."""
  kv = (("batch", "kv_heads", "length", "head_dim"),) * cfg.num_layers
  think = (kv[0],) * cfg.thinking_layers if cfg.has_thinking_head else None
  return Cache(k=kv, v=kv, think_k=think, think_v=think, valid_BS=("batch", "length"), end=(),
               next_pos_B=("batch",), think_open_B=("batch",))


def _attention_mask(query_slot_T: jax.Array, key_slot_S: jax.Array,
                    key_valid_BS: jax.Array) -> jax.Array:
  """Causal mask over valid keys; every query also sees its own slot, so a padding query
  (left padding) attends to itself instead of spreading uniformly over future slots."""
  causal_TS = query_slot_T[:, None] >= key_slot_S[None, :]
  self_TS = query_slot_T[:, None] == key_slot_S[None, :]
  return causal_TS[None] & (key_valid_BS[:, None, :] | self_TS[None])


def run(params: Any, cfg: ModelConfig, tokens_BT: jax.Array, token_mask_BT: jax.Array | None = None,
        *, cache: Cache | None = None, experts_LBTA: jax.Array | None = None,
        think_mask_BT: jax.Array | None = None, decoding: bool | None = None) -> Output:
  """The forward pass to final hidden states (use `project` for logits).

  tokens_BT: int ids; token_mask_BT: True for real tokens (default: tokens != pad_id).
  Without a cache: a causal pass over the sequences (left or right padding). Rotary positions
  count real tokens only, so left padding does not change results.
  With a cache: the T tokens are appended at slot `cache.end` for every row (prefill with T > 1,
  decode with T = 1) and the updated cache is returned.
  experts_LBTA: replay these expert choices in the base layers (router replay).
  think_mask_BT: override the think-span mask computed from the tokens.
  decoding: a sampler pass, never differentiated (default: whenever there is a cache): the layer
  stack is unrolled and the MoE sizes its capacity to the busiest expert at run time. A pass
  with a cache that is differentiated (the RL update's shared prompts) sets it False.
  """
  decoding = cache is not None if decoding is None else decoding
  if decoding and cache is None:
    raise ValueError("run(decoding=True) needs a cache.")
  B, T = tokens_BT.shape
  if token_mask_BT is None:
    token_mask_BT = tokens_BT != cfg.pad_id
  token_mask_BT = token_mask_BT.astype(bool)
  rank_BT = jnp.cumsum(token_mask_BT, axis=1, dtype=jnp.int32) - 1
  if cache is None:
    pos_BT = jnp.maximum(rank_BT, 0)
    mask_BTS = _attention_mask(jnp.arange(T), jnp.arange(T), token_mask_BT)
    write_index, open_in = None, None
    cache_in = {"k": None, "v": None, "think_k": None, "think_v": None}
  else:
    pos_BT = jnp.maximum(cache.next_pos_B[:, None] + rank_BT, 0)
    valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, token_mask_BT, (0, cache.end))
    mask_BTS = _attention_mask(cache.end + jnp.arange(T), jnp.arange(cache.size), valid_BS)
    write_index, open_in = cache.end, cache.think_open_B
    # Stacked for the (unrolled) layer scan, whose per-layer slices XLA folds back to the arrays.
    stack = lambda c: None if c is None else jnp.stack(c)
    cache_in = {"k": stack(cache.k), "v": stack(cache.v), "think_k": stack(cache.think_k),
                "think_v": stack(cache.think_v)}
  if think_mask_BT is None:
    think_mask_BT = think_mask(tokens_BT, token_mask_BT, cfg, open_in)

  (hidden, base_out, think_out, step_logits), state = Transformer(cfg, decoding).apply(
      {"params": params}, tokens_BT, pos_BT, mask_BTS, token_mask_BT, think_mask_BT, write_index,
      cache_in, experts_LBTA, mutable=["intermediates"])
  aux = _aux_losses(state["intermediates"])

  new_cache = None
  if cache is not None:
    split = lambda c_L: None if c_L is None else tuple(c_L)  # the layer scan stacked them
    new_cache = Cache(k=split(base_out["k"]), v=split(base_out["v"]),
                      think_k=split(think_out["k"]), think_v=split(think_out["v"]),
                      valid_BS=valid_BS,
                      end=cache.end + T,
                      next_pos_B=cache.next_pos_B + token_mask_BT.sum(1, dtype=jnp.int32),
                      think_open_B=think_mask_BT[:, -1])
  return Output(hidden=hidden, cache=new_cache, experts_LBTA=base_out["experts"],
                step_logits_BTC=step_logits, aux=aux)


def _aux_losses(intermediates: Any) -> dict[str, Any]:
  """Per-layer MoE statistics of the base and thinking stacks: losses averaged over layers."""
  stacks = [intermediates["layers"]["moe"]]
  if "thinking" in intermediates:
    stacks.append(intermediates["thinking"]["layers"]["moe"])
  return _aux_from_stats({k: jnp.concatenate([s[k][0] for s in stacks]) for k in moe.STATS})


def _aux_from_stats(stats: dict[str, jax.Array]) -> dict[str, Any]:
  """The losses of per-layer statistics (moe.STATS), averaged over layers."""
  balance_L = moe.load_balance_loss(stats["expert_load"], stats["router_prob"])
  return {"load_balance_loss": jnp.mean(balance_L), "z_loss": jnp.mean(stats["z_loss"]),
          "expert_load": stats["expert_load"], "stats": stats}


def merge_aux(parts: Sequence[tuple[dict[str, Any], float]]) -> dict[str, Any]:
  """The aux losses of one pass over all the parts' tokens, from the `Output.aux` of passes
  over disjoint tokens, each part's tokens counted `weight` times (a prompt run once for G
  samples has weight G): every statistic is a per-layer token mean, so the merge is exact."""
  w_L = [weight * aux["stats"]["tokens"] for aux, weight in parts]
  total_L = sum(w_L)
  along = lambda w_L, x: w_L.reshape(w_L.shape + (1,) * (x.ndim - 1))  # [L] against [L, ...]

  def mean(k):
    xs = [aux["stats"][k] for aux, _ in parts]
    return sum(along(w, x) * x for w, x in zip(w_L, xs)) / along(jnp.maximum(total_L, 1.0), xs[0])

  return _aux_from_stats({**{k: mean(k) for k in moe.STATS if k != "tokens"}, "tokens": total_L})


def _unembedding(params: Any, cfg: ModelConfig, thinking: bool) -> jax.Array:
  if thinking and not cfg.thinking_shared_unembed:
    return params["thinking"]["lm_head"]
  return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def project(params: Any, cfg: ModelConfig, hidden: Hidden) -> jax.Array:
  """Float32 logits [B, T, V]: thinking-head logits inside think spans, base logits elsewhere.

  Works on any time slice of `hidden`, so callers can compute log-probs chunk by chunk.
  """
  dt = cfg.dtype
  mm = lambda h, w: jnp.einsum("BTD,DV->BTV", h.astype(dt), w.astype(dt),
                               preferred_element_type=jnp.float32)
  if hidden.think_BTD is None:
    return mm(hidden.base_BTD, _unembedding(params, cfg, False))
  mask = hidden.think_mask_BT[..., None]
  if cfg.thinking_shared_unembed:
    return mm(jnp.where(mask, hidden.think_BTD, hidden.base_BTD), _unembedding(params, cfg, False))
  return jnp.where(mask, mm(hidden.think_BTD, _unembedding(params, cfg, True)),
                   mm(hidden.base_BTD, _unembedding(params, cfg, False)))


def forward(params: Any, cfg: ModelConfig, tokens_BT: jax.Array,
            token_mask_BT: jax.Array | None = None) -> jax.Array:
  """Logits [B, T, V] (float32) of a full causal pass; think spans found from the token ids."""
  return project(params, cfg, run(params, cfg, tokens_BT, token_mask_BT).hidden)


def _init_fn(cfg: ModelConfig):
  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1), bool)
    return Transformer(cfg).init(rng, tokens, jnp.zeros((1, 1), jnp.int32), mask[:, :, None],
                                 mask, mask, None, {"k": None, "v": None, "think_k": None,
                                                    "think_v": None})["params"]
  return init


@functools.cache
def abstract_params(cfg: ModelConfig) -> Any:
  """Shapes, dtypes and logical axes (nn.Partitioned leaves) of the parameters; no allocation.
  Cached per config: tracing the model's init takes ~0.15 s and a run asks for this ~50 times."""
  return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """The parameters' layout on `mesh`; cfg.indivisible_params says what to do with a dimension a
  mesh axis does not divide (corpo_jax/sharding.py)."""
  return sharding.tree_shardings(abstract_params(cfg), mesh, indivisible=cfg.indivisible_params)


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """The config of the sampler's copy (`for_decoding`): parameters in the compute dtype, and a
  dimension the decode view does not divide kept whole (see there)."""
  return dataclasses.replace(cfg, param_dtype=cfg.dtype, indivisible_params="replicate")


def for_decoding(params: Any, cfg: ModelConfig,
                 mesh: jax.sharding.Mesh) -> tuple[Any, ModelConfig, jax.sharding.Mesh]:
  """(params, cfg, mesh) of a sampler's copy of the policy: the parameters cast to the compute
  dtype and laid out on `sharding.decode_mesh(mesh)`, the same devices with fsdp folded into
  tensor. Made from the trainer's params (which stay as they are) once per rollout. That view's
  tensor axis (fsdp x tensor) may not divide a dimension the trainer's layout splits another way
  (Mixtral's 8 KV heads on fsdp 16): the copy keeps such a dimension whole, by design
  (`bench scale --program=rollout` counts it)."""
  decode_cfg = decoding_config(cfg)
  decode_mesh = sharding.decode_mesh(mesh)
  cast = jax.tree.map(lambda x: x.astype(decode_cfg.param_dtype), params)
  return jax.device_put(cast, param_shardings(decode_cfg, decode_mesh)), decode_cfg, decode_mesh


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Initialises parameters directly into their shardings (never materialised replicated)."""
  init = lambda r: nn.unbox(_init_fn(cfg)(r))
  if mesh is None:
    return jax.jit(init)(rng)
  return jax.jit(init, out_shardings=param_shardings(cfg, mesh))(rng)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(tree)))
