"""Mixture of SwiGLU experts: float32 router, auxiliary losses and the dispatch paths.

Routing: top-k on the router logits, then a softmax over the k chosen logits (identical to
Mixtral's softmax-over-all, top-k, renormalise). Dispatch computes only the chosen experts' FLOPs.
`ModelConfig.moe_dispatch` alone picks the path (never the backend or the mesh):

* ``capacity``: each expert gets C = min(N, ceil(cf * N * A / E)) slots; tokens are gathered into
  an [E, C, D] buffer (first choices of every token before second choices, then token order),
  run through a batched einsum, and gathered back. Overflowing assignments are dropped while
  training; decoding passes use C = N, so a sampled token never depends on which rows share its
  batch. With cf >= E / A nothing can be dropped. Partitioned by the compiler on a mesh.
* ``expert_parallel`` (`dispatch_expert_parallel`): GShard on the mesh. Each device routes its
  own tokens and counts capacity over them alone; an all_to_all over the "expert" axis sends the
  [E, C, D] slots to the experts' owners and brings the results back; expert weights are
  gathered over fsdp inside a shard_map; decoding sizes capacity so that nothing drops. The
  path for large models on a mesh (docs/scale.md); with one device it is ``capacity``.
* ``sort``: dropless; assignments sorted by expert and run through `jax.lax.ragged_dot`
  (grouped matmul kernels on TPU/GPU). On XLA:CPU ragged_dot is several times slower than dense
  matmuls (at E 32, `bench update` 35.8 s with it, 3.2 s with ``cpu_dropless``).
* ``cpu_dropless``: the single-device CPU path of the demo, dropless, tuned on XLA:CPU
  (docs/benchmarks.md). Passes that are differentiated (training, the reference forward) use
  `dispatch_blocks`: each expert's tokens padded to blocks, about N * A rows instead of the
  E * N capacity rows, through one loop over the blocks with a hand-written gradient
  (`grouped_swiglu`). Decoding passes (the sampler's prefill and decode steps, never
  differentiated) use `dispatch_fitted`: capacity dispatch with C sized at run time to the
  busiest expert's load (lax.switch over a few static sizes). Measured on CPU (one layer, E 4,
  top-2, D 256, F 1024; `python -m corpo_jax.bench.moe_dispatch --tokens ...`): forward only,
  the two are about as fast (N 32: 1.7-3.1 vs 2.7 ms, N 3072: 118-123 vs 113 ms), but a decode
  step with blocks was 1.5x slower (the loop over tiny blocks); forward+backward,
  `dispatch_fitted` keeps the residuals of every switch branch and is 2.4x slower at N 3072
  (783 vs 328 ms). On a multi-device mesh it runs (the compiler partitions the loop) but its
  collectives run once per block: use ``capacity`` or ``expert_parallel`` there.

Auxiliary losses (sown into the "intermediates" collection, one value per layer):
* ``load_balance_loss`` (Switch Transformer): E * sum_e f_e * P_e, f_e the fraction of the
  N * A assignments that go to expert e, P_e the mean router probability (softmax over all E) of
  expert e. 1.0 at perfect balance. (Hugging Face's Mixtral loss is top_k times this.)
* ``z_loss`` (ST-MoE): mean over tokens of logsumexp(router logits)^2.
* ``expert_load``: f_e per expert, for logging.
Padding tokens (token_mask False) are excluded from the losses and from the capacity buffers.

One module (over 400 lines) because the router, the auxiliary losses and every dispatch path
share one routing contract (which assignments a capacity drops, the gate normalisation), and
the tests compare the paths with each other.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from corpo_jax import sharding
from corpo_jax.model.config import ModelConfig
from corpo_jax.model.layers import fan_in_init, param
from corpo_jax.sharding import constrain


def route(logits_NE: jax.Array, top_k: int,
          experts_NA: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chosen experts [N, A] and their gates: softmax over the chosen logits (float32).

  `experts_NA` replays a given choice (router replay); gradients still flow through the logits.
  """
  if experts_NA is None:
    _, experts_NA = jax.lax.top_k(logits_NE, top_k)
  chosen_NA = jnp.take_along_axis(logits_NE, experts_NA, axis=-1)
  return experts_NA, jax.nn.softmax(chosen_NA, axis=-1)


# What a layer sows: per-layer token means and the token count, from which the losses follow
# (`load_balance_loss`) and which passes over disjoint tokens merge exactly (model.merge_aux).
STATS = ("expert_load", "router_prob", "z_loss", "tokens")


def load_balance_loss(load_E: jax.Array, prob_E: jax.Array) -> jax.Array:
  """Switch load-balancing loss E * sum_e f_e * P_e (over the last axis; see module doc)."""
  return load_E.shape[-1] * jnp.sum(load_E * prob_E, axis=-1)


def aux_losses(logits_NE: jax.Array, experts_NA: jax.Array,
               token_mask_N: jax.Array) -> dict[str, jax.Array]:
  """Load-balancing loss, z-loss and per-expert load over the unmasked tokens (float32), and
  the mean router probabilities and token count they come from."""
  E = logits_NE.shape[-1]
  w_N = token_mask_N.astype(jnp.float32)
  count = jnp.maximum(w_N.sum(), 1.0)
  assign_NE = jax.nn.one_hot(experts_NA, E, dtype=jnp.float32).sum(1) * w_N[:, None]
  load_E = assign_NE.sum(0) / (count * experts_NA.shape[-1])
  prob_E = (jax.nn.softmax(logits_NE, axis=-1) * w_N[:, None]).sum(0) / count
  z_N = jax.nn.logsumexp(logits_NE, axis=-1) ** 2
  return {"load_balance_loss": load_balance_loss(load_E, prob_E),
          "z_loss": jnp.sum(z_N * w_N) / count,
          "expert_load": load_E,
          "router_prob": prob_E,
          "tokens": w_N.sum()}


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
  return max(1, min(num_tokens, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k
                                          / cfg.num_experts)))


# checkpoint_name of the expert matmuls' outputs, which remat policies can save by name
# (model/transformer.py: remat "experts", "dots_and_experts").
EXPERT_MATMULS = ("expert_gate", "expert_up", "expert_down")


def _swiglu_ECD(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
  """SwiGLU batched over the leading axis (experts, or blocks with their experts' weights)."""
  gate, up, down = EXPERT_MATMULS
  h_ECF = (jax.nn.silu(checkpoint_name(jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate_EDF), gate))
           * checkpoint_name(jnp.einsum("ECD,EDF->ECF", x_ECD, w_up_EDF), up))
  return checkpoint_name(jnp.einsum("ECF,EFD->ECD", h_ECF, w_down_EFD), down)


class _Slots(NamedTuple):
  expert_M: jax.Array
  live_M: jax.Array
  pos_M: jax.Array
  token_EN: jax.Array
  filled_EN: jax.Array


def _slots(experts_NA, token_mask_N, E: int, dtype) -> _Slots:
  """Assignments in priority order (all first choices, then all second choices, ...): expert_M,
  live_M, pos_M (rank within its expert), and the full-capacity (C = N) slot table: token_EN
  (which token fills slot (e, c)) and filled_EN (1 where one does). Capacity C keeps the
  assignments with pos_M < C, i.e. the first C slots of each expert."""
  N, A = experts_NA.shape
  expert_M = experts_NA.T.reshape(-1)
  live_M = jnp.tile(token_mask_N, A)
  onehot_ME = jax.nn.one_hot(expert_M, E, dtype=jnp.int32) * live_M[:, None]
  pos_M = jnp.sum((jnp.cumsum(onehot_ME, axis=0) - 1) * onehot_ME, axis=1)
  full_M = jnp.where(live_M, expert_M * N + pos_M, E * N)  # E*N: the drop bin
  token_EN = jnp.zeros((E * N + 1,), jnp.int32).at[full_M].set(
      jnp.tile(jnp.arange(N), A))[:-1].reshape(E, N)
  filled_EN = jnp.zeros((E * N + 1,), dtype).at[full_M].set(1)[:-1].reshape(E, N)
  return _Slots(expert_M, live_M, pos_M, token_EN, filled_EN)


def _constrained_swiglu_ECD(x_ECD, *weights):
  names = ("exp", "capacity", "act_embed")
  return constrain(_swiglu_ECD(constrain(x_ECD, names), *weights), names)


def _capacity_run(x_ND, gates_NA, weights, slots: _Slots, C: int,
                  experts=_constrained_swiglu_ECD):
  """The experts on the first C slots of each (`experts(x_ECD, *weights) -> y_ECD`), combined
  back per token. Returns y_ND."""
  N, D = x_ND.shape
  A = gates_NA.shape[1]
  E = slots.token_EN.shape[0]
  expert_M, live_M, pos_M, token_EN, filled_EN = slots
  y_ECD = experts(x_ND[token_EN[:, :C]] * filled_EN[:, :C, None], *weights)
  y_SD = jnp.concatenate([y_ECD.reshape(E * C, D), jnp.zeros((1, D), y_ECD.dtype)])
  slot_M = jnp.where(live_M & (pos_M < C), expert_M * C + pos_M, E * C)  # E*C: dropped
  y_MD = y_SD[slot_M] * gates_NA.T.reshape(-1, 1).astype(x_ND.dtype)
  return y_MD.reshape(A, N, D).sum(0)


def dispatch_capacity(x_ND, experts_NA, gates_NA, token_mask_N, weights, C: int):
  """Capacity-factor dispatch (see module docstring). Returns y_ND."""
  slots = _slots(experts_NA, token_mask_N, weights[0].shape[0], x_ND.dtype)
  return _capacity_run(x_ND, gates_NA, weights, slots, C)


def dispatch_sort(x_ND, experts_NA, gates_NA, token_mask_N, weights):
  """Dropless dispatch: sort assignments by expert, grouped matmuls with ragged_dot."""
  del token_mask_N  # padding costs FLOPs here but cannot displace real tokens
  w_gate, w_up, w_down = weights
  N, D = x_ND.shape
  E, A = w_gate.shape[0], experts_NA.shape[1]
  expert_M = experts_NA.reshape(-1)
  order_M = jnp.argsort(expert_M, stable=True)
  x_MD = x_ND[order_M // A]
  sizes_E = jnp.bincount(expert_M, length=E).astype(jnp.int32)
  h_MF = (jax.nn.silu(jax.lax.ragged_dot(x_MD, w_gate, sizes_E))
          * jax.lax.ragged_dot(x_MD, w_up, sizes_E))
  y_sorted_MD = jax.lax.ragged_dot(h_MF, w_down, sizes_E)
  y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD)
  return jnp.sum(y_MD.reshape(N, A, D) * gates_NA[..., None].astype(x_ND.dtype), axis=1)


def dispatch_fitted(x_ND, experts_NA, gates_NA, token_mask_N, weights, steps: int = 8):
  """Capacity dispatch where full capacity (C = N) drops nothing, with C instead the smallest
  multiple of N / steps that holds the busiest expert's tokens, picked at run time with
  lax.switch (one compiled branch per size). Same result as C = N, fewer FLOPs: E * C rows
  instead of E * N (at decode, N 32: C 20-24 instead of 32). The slot table is built once,
  outside the branches; each branch only gathers, multiplies and combines."""
  N, E = x_ND.shape[0], weights[0].shape[0]
  sizes = sorted({max(1, -(-N * i // steps)) for i in range(1, steps + 1)})
  slots = _slots(experts_NA, token_mask_N, E, x_ND.dtype)
  load_E = jnp.sum(slots.filled_EN > 0, axis=1)  # live assignments per expert
  branch = jnp.searchsorted(jnp.asarray(sizes), jnp.max(load_E))
  return jax.lax.switch(branch, [functools.partial(_capacity_run, x_ND, gates_NA, weights, slots, C)
                                 for C in sizes])


def grouped_swiglu(x_bcD, weights, expert_b, used):
  """Each block of rows through its expert's SwiGLU: y_b = (silu(x_b Wg) * (x_b Wu)) Wd with
  W = weights[...][expert_b]. `used`: the number of leading blocks that hold rows (a traced
  scalar); the blocks after them come out zero. One loop over the used blocks that reads each
  expert's matrices in place (`_looped_swiglu`). Returns y_bcD."""
  return _looped_swiglu(x_bcD, *weights, expert_b, jnp.asarray(used, jnp.int32))


def _at(a, i):
  """a[i] for a traced index i, without a copy when XLA can read in place."""
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a, v, i):
  """a with a[i] = v (in place inside a loop)."""
  return jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def _swiglu_block(x_cD, w_gate_DF, w_up_DF, w_down_FD):
  """One block's SwiGLU; returns (y_cD, residuals for the backward pass)."""
  g_cF, u_cF = x_cD @ w_gate_DF, x_cD @ w_up_DF
  return (jax.nn.silu(g_cF) * u_cF) @ w_down_FD, (g_cF, u_cF)


@jax.custom_vjp
def _looped_swiglu(x_bcD, w_gate, w_up, w_down, expert_b, used):
  """grouped_swiglu as one loop over the used blocks with a hand-written gradient. Each block
  indexes its expert's three matrices in place; the backward loop adds x_b^T dg_b, x_b^T du_b
  and h_b^T dy_b to its expert's weight gradients in place (float32 accumulators), in block
  order. Replaced, measured on CPU: autodiff of batched matmuls over per-block weight copies
  (which it kept for the backward pass and whose per-block gradients it scatter-added: one
  layer's forward and backward 1.2x slower at E 4, 1.7x at E 32), then one such loop per
  matrix (3 loops forward, 3 backward; docs/benchmarks.md "Session 9"). The run-time trip
  count skips the padding blocks that the static shape reserves (E * (block - 1) rows)."""
  return _looped_swiglu_fwd(x_bcD, w_gate, w_up, w_down, expert_b, used)[0]


def _looped_swiglu_fwd(x_bcD, w_gate, w_up, w_down, expert_b, used):
  num_blocks, rows, D = x_bcD.shape
  F = w_gate.shape[2]

  def block(b, outs):
    y_bcD, g_bcF, u_bcF = outs
    e = expert_b[b]
    y_cD, (g_cF, u_cF) = _swiglu_block(_at(x_bcD, b), _at(w_gate, e), _at(w_up, e),
                                       _at(w_down, e))
    return _put(y_bcD, y_cD, b), _put(g_bcF, g_cF, b), _put(u_bcF, u_cF, b)

  dtype = jnp.result_type(x_bcD, w_gate)
  zeros = lambda n: jnp.zeros((num_blocks, rows, n), dtype)
  y_bcD, g_bcF, u_bcF = jax.lax.fori_loop(0, used, block, (zeros(D), zeros(F), zeros(F)))
  return y_bcD, (x_bcD, g_bcF, u_bcF, w_gate, w_up, w_down, expert_b, used)


def _looped_swiglu_bwd(residuals, dy_bcD):
  x_bcD, g_bcF, u_bcF, w_gate, w_up, w_down, expert_b, used = residuals
  outer = lambda a_cI, b_cO: jnp.einsum("cI,cO->IO", a_cI, b_cO,
                                        preferred_element_type=jnp.float32)

  def accumulate(dw_EIO, e, dw_IO):
    return _put(dw_EIO, _at(dw_EIO, e) + dw_IO, e)

  def block(b, carry):
    dx_bcD, dw_gate, dw_up, dw_down = carry
    e = expert_b[b]
    x_cD, g_cF, u_cF, dy_cD = (_at(a, b) for a in (x_bcD, g_bcF, u_bcF, dy_bcD))
    h_cF, swiglu_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g_cF, u_cF)
    dg_cF, du_cF = swiglu_vjp(dy_cD @ _at(w_down, e).T)
    dx_cD = dg_cF @ _at(w_gate, e).T + du_cF @ _at(w_up, e).T
    return (_put(dx_bcD, dx_cD, b),
            accumulate(dw_gate, e, outer(x_cD, dg_cF)), accumulate(dw_up, e, outer(x_cD, du_cF)),
            accumulate(dw_down, e, outer(h_cF, dy_cD)))

  f32_zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
  dx_bcD, dw_gate, dw_up, dw_down = jax.lax.fori_loop(
      0, used, block,
      (jnp.zeros_like(x_bcD), f32_zeros(w_gate), f32_zeros(w_up), f32_zeros(w_down)))
  float0 = lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
  return (dx_bcD, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
          dw_down.astype(w_down.dtype), float0(expert_b), float0(used))


_looped_swiglu.defvjp(_looped_swiglu_fwd, _looped_swiglu_bwd)


def block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block of `dispatch_blocks`: the power of two nearest a quarter of the mean
  assignments per expert, in [8, 256] (256 measured fastest on CPU at the demo sizes)."""
  target = max(num_assignments / (4 * num_experts), 1)
  return int(min(256, max(8, 2 ** round(math.log2(target)))))


def dispatch_blocks(x_ND, experts_NA, gates_NA, token_mask_N, weights, block: int):
  """Dropless dispatch: assignments sorted by expert, each expert's group padded to a multiple of
  `block` rows; block b runs through its expert's SwiGLU (`grouped_swiglu`). R = N * A +
  E * (block - 1) rows, rounded up to whole blocks (unused blocks are zeros and skipped): the
  cost follows top_k, not the E * C capacity rows. Shape letters: M assignments (N * A), R block
  rows, b blocks, c rows per block. Returns y_ND."""
  N, D = x_ND.shape
  E, A = weights[0].shape[0], experts_NA.shape[1]
  M = N * A
  R = -(-(M + E * (block - 1)) // block) * block
  live_M = jnp.repeat(token_mask_N, A)  # assignment m is token m // A's choice m % A
  expert_M = jnp.where(live_M, experts_NA.reshape(M), E)  # padding: a group of its own, last
  sizes_E = jnp.bincount(expert_M, length=E + 1)[:E]
  padded_E = -(-sizes_E // block) * block
  rank_M = jnp.zeros((M,), jnp.int32).at[jnp.argsort(expert_M, stable=True)].set(
      jnp.arange(M, dtype=jnp.int32))  # position in the expert-sorted order
  e_M = jnp.minimum(expert_M, E - 1)
  slot_M = jnp.where(live_M, (jnp.cumsum(padded_E) - padded_E)[e_M] + rank_M
                     - (jnp.cumsum(sizes_E) - sizes_E)[e_M], R)  # R: the drop bin
  token_of_slot = jnp.zeros((R + 1,), jnp.int32).at[slot_M].set(jnp.arange(M) // A)[:R]
  filled = jnp.zeros((R + 1,), x_ND.dtype).at[slot_M].set(1)[:R]
  x_bcD = (x_ND[token_of_slot] * filled[:, None]).reshape(R // block, block, D)
  expert_b = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(0, R, block),
                                          side="right"), E - 1)
  used = jnp.sum(padded_E) // block  # blocks holding rows; the rest are zeros
  y_RD = grouped_swiglu(x_bcD, weights, expert_b, used).reshape(R, D)
  y_SD = jnp.concatenate([y_RD, jnp.zeros((1, D), y_RD.dtype)])
  y_MD = y_SD[slot_M] * gates_NA.reshape(M, 1).astype(x_ND.dtype)
  return y_MD.reshape(N, A, D).sum(1)


def dispatch_expert_parallel(x_ND, logits_NE, replay_NA, token_mask_N, weights, cfg: ModelConfig,
                             decoding: bool):
  """GShard dispatch on the ambient mesh: each device routes the tokens it holds (`route`, with
  `replay_NA` if given), counts expert capacity over them alone (its group), and sends each
  expert's slots to the expert's owner with an all_to_all over the "expert" axis, which runs the
  expert and sends the results back the same way. Expert weights are gathered over their
  "embed" (fsdp) axis inside the map in the compute dtype; a d_ff sharded over "tensor" gets its
  psum after the down projection. Capacity per group is `capacity(n, cfg)` for the group's n
  tokens while training, and n when decoding, which no expert can exceed (a token's top_k
  experts are distinct), so decoding never drops a token. Tokens that do not split over all the
  batch devices (a batch smaller than the mesh, or no mesh) are one group, dispatched by the
  compiler's partitioning. Returns (y_ND, experts_NA, gates_NA); the aux losses are computed
  from them outside, over all tokens."""
  mesh = jax.sharding.get_abstract_mesh()
  N = x_ND.shape[0]
  sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
  tok = _names(sharding.logical_to_spec(("batch",), (N,), sizes)[0]) if sizes else ()
  group = functools.partial(_expert_group, cfg=cfg, decoding=decoding)
  if set(tok) != set(_names(sharding.RULES_BY_NAME["batch"])):
    return group(x_ND, logits_NE, replay_NA, token_mask_N, weights, axes=_GroupAxes((), (), ()))
  used = lambda entry: tuple(a for a in _names(entry) if sizes[a] > 1)  # no size-1 collectives
  specs = tuple(P(*map(used, sharding.logical_to_spec(names, w.shape, sizes)))
                for names, w in zip(_WEIGHT_AXES, weights))
  axes = _GroupAxes(*specs[0])
  row = lambda x: None if x is None else P(tok, *(None,) * (x.ndim - 1))
  rows = (row(x_ND), row(logits_NE), row(replay_NA), row(token_mask_N))
  return jax.shard_map(functools.partial(group, axes=axes), mesh=mesh,
                       in_specs=(*rows, specs), out_specs=(row(x_ND),) + (row(logits_NE),) * 2)(
                           x_ND, logits_NE, replay_NA, token_mask_N, weights)


_WEIGHT_AXES = (("exp", "embed", "mlp"), ("exp", "embed", "mlp"), ("exp", "mlp", "embed"))


class _GroupAxes(NamedTuple):
  """Mesh axes (manual inside the shard_map) of the expert weights' dims."""

  experts: tuple[str, ...]
  embed: tuple[str, ...]
  mlp: tuple[str, ...]


def _names(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _expert_group(x_nD, logits_nE, replay_nA, mask_n, weights, *, axes: _GroupAxes,
                  cfg: ModelConfig, decoding: bool):
  """One device's part of dispatch_expert_parallel (n: its tokens, E_loc: its experts)."""
  n = x_nD.shape[0]
  experts_nA, gates_nA = route(logits_nE, cfg.top_k, replay_nA)
  gather = lambda w, dim: (jax.lax.all_gather(w, axes.embed, axis=dim, tiled=True)
                           if axes.embed else w)
  w_gate, w_up, w_down = gather(weights[0], 1), gather(weights[1], 1), gather(weights[2], 2)

  def experts(x_ECD):
    if axes.experts:  # [E, C, D] -> [E_loc, X * C, D]: every group's slots of my experts
      x_ECD = jax.lax.all_to_all(x_ECD, axes.experts, 0, 1, tiled=True)
    y_ECD = _swiglu_ECD(x_ECD, w_gate, w_up, w_down)
    if axes.mlp:
      y_ECD = jax.lax.psum(y_ECD, axes.mlp)
    if axes.experts:  # and back to the groups
      y_ECD = jax.lax.all_to_all(y_ECD, axes.experts, 1, 0, tiled=True)
    return y_ECD

  slots = _slots(experts_nA, mask_n, cfg.num_experts, x_nD.dtype)
  y_nD = _capacity_run(x_nD, gates_nA, (), slots, n if decoding else capacity(n, cfg),
                       experts=experts)
  return y_nD, experts_nA, gates_nA


def dispatch(cfg: ModelConfig, x_ND, experts_NA, gates_NA, mask_N, weights, decoding: bool):
  """The capacity, sort and cpu_dropless paths (module doc). Returns y_ND."""
  N = x_ND.shape[0]
  if cfg.moe_dispatch == "cpu_dropless":
    if decoding:
      return dispatch_fitted(x_ND, experts_NA, gates_NA, mask_N, weights)
    return dispatch_blocks(x_ND, experts_NA, gates_NA, mask_N, weights,
                           block_size(N * cfg.top_k, cfg.num_experts))
  if cfg.moe_dispatch == "capacity":
    return dispatch_capacity(x_ND, experts_NA, gates_NA, mask_N, weights,
                             N if decoding else capacity(N, cfg))
  return dispatch_sort(x_ND, experts_NA, gates_NA, mask_N, weights)


class MoE(nn.Module):
  """Router + SwiGLU experts. Returns (y_BTD, experts_BTA)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, token_mask_BT: jax.Array,
               experts_BTA: jax.Array | None = None,
               decoding: bool = False) -> tuple[jax.Array, jax.Array]:
    """decoding: a sampler pass (never differentiated; picks the dispatch)."""
    cfg = self.cfg
    D, F, E = cfg.d_model, cfg.d_ff, cfg.num_experts
    w_router = param(self, "router", (D, E), ("embed", None), fan_in_init(0, 1), cfg)
    w_gate = param(self, "gate", (E, D, F), ("exp", "embed", "mlp"), fan_in_init(1, 2, (0,)), cfg)
    w_up = param(self, "up", (E, D, F), ("exp", "embed", "mlp"), fan_in_init(1, 2, (0,)), cfg)
    w_down = param(self, "down", (E, F, D), ("exp", "mlp", "embed"), fan_in_init(1, 2, (0,)), cfg)

    B, T, _ = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D).astype(cfg.dtype)
    mask_N = token_mask_BT.reshape(B * T)
    logits_NE = jnp.einsum("ND,DE->NE", x_ND.astype(jnp.float32), w_router.astype(jnp.float32))
    replay_NA = None if experts_BTA is None else experts_BTA.reshape(B * T, -1)
    weights = tuple(w.astype(cfg.dtype) for w in (w_gate, w_up, w_down))
    if cfg.moe_dispatch == "expert_parallel":
      y_ND, experts_NA, _ = dispatch_expert_parallel(x_ND, logits_NE, replay_NA, mask_N, weights,
                                                     cfg, decoding)
    else:
      experts_NA, gates_NA = route(logits_NE, cfg.top_k, replay_NA)
      y_ND = dispatch(cfg, x_ND, experts_NA, gates_NA, mask_N, weights, decoding)
    aux = aux_losses(logits_NE, experts_NA, mask_N)
    for name in STATS:
      self.sow("intermediates", name, aux[name])
    return y_ND.reshape(B, T, D), experts_NA.reshape(B, T, -1)
