"""Router, auxiliary losses and the dispatch paths, checked against hand-computed cases."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax.model import moe
from corpo_jax.model.config import ModelConfig


def test_route_on_literal_logits():
  logits_NE = jnp.array([[1.0, 3.0, 2.0, 0.0],
                         [0.0, 0.5, 5.0, 1.0],
                         [-1.0, -2.0, -0.5, -3.0]])
  experts_NA, gates_NA = moe.route(logits_NE, top_k=2)
  np.testing.assert_array_equal(experts_NA, [[1, 2], [2, 3], [2, 0]])
  e = math.e
  np.testing.assert_allclose(gates_NA, [[e / (e + 1), 1 / (e + 1)],
                                        [1 / (1 + e ** -4), e ** -4 / (1 + e ** -4)],
                                        [1 / (1 + e ** -0.5), e ** -0.5 / (1 + e ** -0.5)]],
                             rtol=1e-6)
  # Identical to Mixtral's softmax over all experts, top-k, renormalise.
  probs_NE = jax.nn.softmax(logits_NE)
  top_NA = jnp.take_along_axis(probs_NE, experts_NA, -1)
  np.testing.assert_allclose(gates_NA, top_NA / top_NA.sum(-1, keepdims=True), rtol=1e-6)
  # Top-1: the gate is 1.
  experts_N1, gates_N1 = moe.route(logits_NE, top_k=1)
  np.testing.assert_array_equal(experts_N1[:, 0], [1, 2, 2])
  np.testing.assert_allclose(gates_N1, 1.0)


def test_route_replays_given_experts_with_gates_from_the_logits():
  logits_NE = jnp.array([[1.0, 3.0, 2.0, 0.0]])
  experts_NA, gates_NA = moe.route(logits_NE, 2, experts_NA=jnp.array([[3, 0]]))
  np.testing.assert_array_equal(experts_NA, [[3, 0]])
  np.testing.assert_allclose(gates_NA, [[1 / (1 + math.e), math.e / (1 + math.e)]], rtol=1e-6)
  # Gradients flow to the logits of the replayed experts only.
  g = jax.grad(lambda l: moe.route(l, 2, jnp.array([[3, 0]]))[1][0, 0])(logits_NE)
  p = 1 / (1 + math.e)
  np.testing.assert_allclose(g, [[-p * (1 - p), 0, 0, p * (1 - p)]], rtol=1e-5, atol=1e-7)


def test_aux_losses_on_a_hand_built_case():
  # Router probabilities are [1,2,3]/6, [4,1,1]/6, [3,1,2]/6; every logsumexp is ln 6.
  # The last token is padding with extreme logits: it must not count.
  logits_NE = jnp.log(jnp.array([[1.0, 2, 3], [4, 1, 1], [3, 1, 2], [90, 1, 1]]))
  experts_NA = jnp.array([[2, 1], [0, 1], [0, 1], [0, 0]])
  mask_N = jnp.array([True, True, True, False])
  aux = moe.aux_losses(logits_NE, experts_NA, mask_N)
  # Assignments per expert: e0 2, e1 3, e2 1 of 6. Mean probabilities: [8, 4, 6] / 18.
  load_E = np.array([2, 3, 1]) / 6
  prob_E = np.array([8, 4, 6]) / 18
  np.testing.assert_allclose(aux["expert_load"], load_E, rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance_loss"], 3 * np.sum(load_E * prob_E), rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance_loss"], 17 / 18, rtol=1e-6)
  np.testing.assert_allclose(aux["z_loss"], math.log(6) ** 2, rtol=1e-6)
  # Perfectly balanced uniform routing gives a load-balance loss of exactly 1.
  flat = moe.aux_losses(jnp.zeros((4, 2)), jnp.array([[0], [1], [0], [1]]), jnp.ones(4, bool))
  np.testing.assert_allclose(flat["load_balance_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(flat["z_loss"], math.log(2) ** 2, rtol=1e-6)


def test_capacity_slots():
  cfg = ModelConfig.preset("tiny", num_experts=4, top_k=2, capacity_factor=1.0)
  assert moe.capacity(10, cfg) == 5  # ceil(1.0 * 10 * 2 / 4)
  assert moe.capacity(7, cfg) == 4  # ceil(3.5)
  assert moe.capacity(10, ModelConfig.preset("tiny", capacity_factor=2.0)) == 10  # = N: no drops
  assert moe.capacity(10, ModelConfig.preset("tiny", capacity_factor=8.0)) == 10  # capped at N
  assert moe.capacity(3, ModelConfig.preset("tiny", capacity_factor=0.01)) == 1


def _weights(E, D, F, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
               for s in [(E, D, F), (E, D, F), (E, F, D)])


def _x_and_routing(N, D, E, A, seed=1):
  rng = np.random.default_rng(seed)
  x_ND = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
  logits_NE = jnp.asarray(rng.standard_normal((N, E)), jnp.float32)
  return (x_ND,) + moe.route(logits_NE, A)


@pytest.mark.parametrize("E,A", [(4, 2), (8, 2), (4, 1)])
def test_capacity_and_sort_dispatch_agree_when_nothing_is_dropped(E, A):
  N, D, F = 24, 16, 32
  x_ND, experts_NA, gates_NA = _x_and_routing(N, D, E, A)
  mask_N = jnp.arange(N) >= 3  # three padding tokens
  weights = _weights(E, D, F)
  cfg = ModelConfig.preset("tiny", num_experts=E, top_k=A, capacity_factor=E / A)
  y_cap = moe.dispatch_capacity(x_ND, experts_NA, gates_NA, mask_N, weights, moe.capacity(N, cfg))
  y_sort = moe.dispatch_sort(x_ND, experts_NA, gates_NA, mask_N, weights)
  np.testing.assert_allclose(y_cap[3:], y_sort[3:], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y_cap[:3], 0.0)  # padding takes no expert
  # Both equal running each chosen expert on each token by hand.
  w_gate, w_up, w_down = weights
  h_NEF = jax.nn.silu(jnp.einsum("ND,EDF->NEF", x_ND, w_gate)) * jnp.einsum("ND,EDF->NEF", x_ND, w_up)
  y_NED = jnp.einsum("NEF,EFD->NED", h_NEF, w_down)
  y_ref = jnp.sum(jnp.take_along_axis(y_NED, experts_NA[..., None], 1) * gates_NA[..., None], 1)
  np.testing.assert_allclose(y_sort, y_ref, rtol=1e-5, atol=1e-5)


def test_capacity_dispatch_drops_exactly_the_predicted_assignments():
  """C = 2 slots per expert; all first choices are placed before second choices, then token order;
  padding (token 0) takes no slot.

  firsts:  t1->e0 (slot 0), t2->e0 (slot 1), t3->e0 DROP, t4->e1 (slot 0)
  seconds: t1->e1 (slot 1), t2->e2 (slot 0), t3->e1 DROP, t4->e0 DROP
  (Token-major priority would instead keep t3->e1 and drop t4->e1; padding taking capacity would
  drop t2->e0.)
  """
  N, D, F, E = 5, 8, 16, 3
  experts_NA = jnp.array([[0, 1], [0, 1], [0, 2], [0, 1], [1, 0]])
  gates_NA = jnp.array([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2]])
  keep_NA = jnp.array([[0, 0], [1, 1], [1, 1], [0, 0], [1, 0]], jnp.float32)
  mask_N = jnp.array([False, True, True, True, True])
  x_ND = jnp.asarray(np.random.default_rng(0).standard_normal((N, D)), jnp.float32)
  weights = _weights(E, D, F)
  y_cap = moe.dispatch_capacity(x_ND, experts_NA, gates_NA, mask_N, weights, C=2)
  y_kept = moe.dispatch_sort(x_ND, experts_NA, gates_NA * keep_NA, mask_N, weights)
  np.testing.assert_allclose(y_cap, y_kept, rtol=1e-5, atol=1e-6)
  # The dropped assignments really contribute (the test would notice a different policy).
  y_all = moe.dispatch_sort(x_ND, experts_NA, gates_NA, mask_N, weights)
  assert np.abs(y_all - y_kept)[3:].min(-1).max() > 1e-3


def _moe_layer(cfg, x_BTD, mask_BT):
  module = moe.MoE(cfg)
  params = module.init(jax.random.key(0), x_BTD, mask_BT)["params"]
  return module.apply({"params": params}, x_BTD, mask_BT, mutable=["intermediates"])


def test_cpu_dropless_layer_equals_ragged_dot_without_running_it():
  """E 8, top-2, default capacity factor 2: capacity would drop; "cpu_dropless" must not, and
  the field alone picks the path: "sort" runs ragged_dot (also on CPU), "cpu_dropless" never."""
  cfg = ModelConfig.preset("tiny", moe_dispatch="cpu_dropless", num_experts=8, top_k=2)
  x_BTD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, cfg.d_model)), jnp.float32)
  mask_BT = jnp.array([[False, True, True, True, True, True], [True] * 6])
  layer = moe.MoE(cfg)
  params = nn.unbox(layer.init(jax.random.key(0), x_BTD, mask_BT)["params"])

  def by_ragged_dot(params, x_BTD):
    y_BTD = moe.MoE(dataclasses.replace(cfg, moe_dispatch="sort")).apply(
        {"params": params}, x_BTD, mask_BT)[0]
    return y_BTD.reshape(-1, cfg.d_model)

  by_layer = lambda params, x_BTD: layer.apply({"params": params}, x_BTD, mask_BT)[0]
  assert "ragged_dot" not in str(jax.make_jaxpr(by_layer)(params, x_BTD))
  assert "ragged_dot" in str(jax.make_jaxpr(by_ragged_dot)(params, x_BTD))
  real_N = np.asarray(mask_BT).reshape(-1)
  y_layer = by_layer(params, x_BTD).reshape(-1, cfg.d_model)
  np.testing.assert_allclose(y_layer[real_N], by_ragged_dot(params, x_BTD)[real_N], rtol=1e-5,
                             atol=1e-6)
  loss = lambda f: lambda p, x: jnp.sum((f(p, x).reshape(-1, cfg.d_model)[real_N]) ** 2)
  grads = jax.grad(loss(by_layer), (0, 1))(params, x_BTD)
  grads_ref = jax.grad(loss(by_ragged_dot), (0, 1))(params, x_BTD)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["capacity", "sort", "cpu_dropless"])
def test_moe_layer_padding_is_excluded_from_aux_losses(dispatch):
  cfg = ModelConfig.preset("tiny", moe_dispatch=dispatch)
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, cfg.d_model)), jnp.float32)
  mask_BT = jnp.array([[False, False, True, True, True, True], [True] * 6])
  (y_BTD, experts_BTA), state = _moe_layer(cfg, x_BTD, mask_BT)
  # Real tokens only: the same row without its padding, batched with the full row.
  (y_ref, _), state_ref = _moe_layer(cfg, x_BTD.at[0, :2].set(x_BTD[1, :2]), mask_BT.at[0].set(True))
  stats = {k: v[0] for k, v in state["intermediates"].items()}
  ref = {k: v[0] for k, v in state_ref["intermediates"].items()}
  assert experts_BTA.shape == (2, 6, cfg.top_k)
  # Recompute the statistics by hand from the routed real tokens only (10 of 12).
  real = np.asarray(mask_BT).reshape(-1)
  counts = np.bincount(np.asarray(experts_BTA).reshape(-1, 2)[real].reshape(-1), minlength=4)
  np.testing.assert_allclose(stats["expert_load"], counts / (10 * 2), rtol=1e-6)
  assert np.abs(stats["expert_load"] - ref["expert_load"]).max() > 0  # padding would have counted
  np.testing.assert_allclose(y_BTD[mask_BT], y_ref[mask_BT], rtol=1e-5, atol=1e-6)


def test_moe_layer_capacity_equals_sort_without_drops():
  cfg = ModelConfig.preset("tiny", capacity_factor=2.0)  # E / top_k = 2: nothing dropped
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, cfg.d_model)), jnp.float32)
  mask_BT = jnp.array([[False, False, True, True, True, True], [True] * 6])
  (y_cap, e_cap), s_cap = _moe_layer(cfg, x_BTD, mask_BT)
  (y_sort, e_sort), s_sort = _moe_layer(ModelConfig.preset("tiny", moe_dispatch="sort"), x_BTD, mask_BT)
  np.testing.assert_array_equal(e_cap, e_sort)
  np.testing.assert_allclose(y_cap[mask_BT], y_sort[mask_BT], rtol=1e-5, atol=1e-6)
  for k in s_cap["intermediates"]:
    np.testing.assert_allclose(s_cap["intermediates"][k][0], s_sort["intermediates"][k][0], rtol=1e-6)


@pytest.mark.parametrize("E,A,block", [(4, 2, 8), (4, 1, 4), (8, 2, 16), (2, 2, 3)])
def test_block_dispatch_equals_capacity_without_drops(E, A, block):
  N, D, F = 24, 16, 32
  x_ND, experts_NA, gates_NA = _x_and_routing(N, D, E, A)
  mask_N = jnp.arange(N) % 7 != 3  # padding tokens inside the sequence
  weights = _weights(E, D, F)
  y_cap = moe.dispatch_capacity(x_ND, experts_NA, gates_NA, mask_N, weights, N)
  y_blk = moe.dispatch_blocks(x_ND, experts_NA, gates_NA, mask_N, weights, block)
  np.testing.assert_allclose(y_blk, y_cap, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y_blk[~np.asarray(mask_N)], 0.0)
  loss = lambda f: lambda w, x: jnp.sum(f(x, experts_NA, gates_NA, mask_N, w) ** 2)
  g_cap = jax.grad(loss(lambda *a: moe.dispatch_capacity(*a, N)), (0, 1))(weights, x_ND)
  g_blk = jax.grad(loss(lambda *a: moe.dispatch_blocks(*a, block)), (0, 1))(weights, x_ND)
  for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_cap)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_grouped_swiglu_gradients_equal_autodiff_of_the_gather(dtype, tol):
  """Expert 2 gets no block, expert 0 two blocks apart, the last block is unused (zeros out,
  no gradient): every accumulation case."""
  rng = np.random.default_rng(3)
  b, c, D, F, E, used = 6, 4, 6, 5, 4, 5
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  x_bcD, dy_bcD = normal(b, c, D), normal(b, c, D)
  weights = (normal(E, D, F), normal(E, D, F), normal(E, F, D))
  expert_b = jnp.array([0, 1, 1, 3, 0, 3])

  def gathered(x, *w):
    wg, wu, wd = (a[expert_b[:used]] for a in w)
    h = jax.nn.silu(jnp.einsum("bcD,bDF->bcF", x[:used], wg)) * jnp.einsum("bcD,bDF->bcF",
                                                                           x[:used], wu)
    return jnp.concatenate([jnp.einsum("bcF,bFD->bcD", h, wd), jnp.zeros_like(x[used:])])

  y, vjp = jax.vjp(lambda x, *w: moe.grouped_swiglu(x, w, expert_b, used), x_bcD, *weights)
  y_ref, vjp_ref = jax.vjp(gathered, x_bcD, *weights)
  np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
  np.testing.assert_array_equal(y[used:], 0.0)
  grads, grads_ref = vjp(dy_bcD), vjp_ref(dy_bcD)
  for g, g_ref in zip(grads, grads_ref):  # bfloat16: both round their own intermediates
    assert g.dtype == dtype
    g, g_ref = np.float32(g), np.float32(g_ref)
    np.testing.assert_allclose(g, g_ref, rtol=tol, atol=tol * np.abs(g_ref).max())
  dx, dw_gate, dw_up, dw_down = grads
  np.testing.assert_array_equal(dx[used:], 0.0)
  for dw in (dw_gate, dw_up, dw_down):
    np.testing.assert_array_equal(dw[2], 0.0)
  # By hand for expert 0's down matrix: blocks 0 and 4.
  x32, dy32, w = np.float32(x_bcD), np.float32(dy_bcD), [np.float32(a[0]) for a in weights]
  h = lambda blk: (lambda g: g / (1 + np.exp(-g)))(x32[blk] @ w[0]) * (x32[blk] @ w[1])
  np.testing.assert_allclose(np.float32(dw_down[0]), h(0).T @ dy32[0] + h(4).T @ dy32[4],
                             rtol=5 * tol, atol=5 * tol)


def test_block_size():
  assert moe.block_size(3072 * 2, 4) == 256  # the demo's update: 384 -> capped
  assert moe.block_size(640, 4) == 32  # a quarter of 160 = 40 -> 32
  assert moe.block_size(64, 4) == 8  # floor


def test_fitted_dispatch_equals_full_capacity():
  """C picked at run time (a branch below C = N) gives the C = N result, gradients included."""
  N, D, F, E, A = 24, 16, 32, 4, 2
  x_ND, experts_NA, gates_NA = _x_and_routing(N, D, E, A)
  mask_N = jnp.arange(N) % 7 != 3
  weights = _weights(E, D, F)
  load = np.bincount(np.asarray(experts_NA)[np.asarray(mask_N)].reshape(-1), minlength=E)
  assert load.max() < N  # a smaller branch than C = N is taken
  capacity = lambda *a: moe.dispatch_capacity(*a, N)
  routed = lambda f: jax.jit(lambda w, x: f(x, experts_NA, gates_NA, mask_N, w))
  np.testing.assert_allclose(routed(moe.dispatch_fitted)(weights, x_ND),
                             routed(capacity)(weights, x_ND), rtol=1e-5, atol=1e-6)
  loss = lambda f: jax.jit(jax.grad(lambda w, x: jnp.sum(routed(f)(w, x) ** 2), (0, 1)))
  g_cap = loss(capacity)(weights, x_ND)
  g_fit = loss(moe.dispatch_fitted)(weights, x_ND)
  for a, b in zip(jax.tree.leaves(g_fit), jax.tree.leaves(g_cap)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,T,decoding,path", [(300, 1, True, "fitted"), (2, 64, True, "fitted"),
                                               (2, 64, False, "blocks")])
def test_cpu_dropless_dispatch_selection(B, T, decoding, path):
  """cpu_dropless: passes with a KV cache (decode, prefill) take the run-time capacity switch,
  other passes the block dispatch; both equal capacity dispatch at C = N."""
  cfg = ModelConfig.preset("tiny", moe_dispatch="cpu_dropless")
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, cfg.d_model)), jnp.float32)
  mask_BT = jnp.asarray(np.random.default_rng(1).random((B, T)) > 0.2)
  module = moe.MoE(cfg)
  params = jax.jit(module.init)(jax.random.key(0), x_BTD[:1, :1], mask_BT[:1, :1])["params"]
  apply = lambda p: module.apply({"params": p}, x_BTD, mask_BT, decoding=decoding,
                                 mutable=["intermediates"])[0]
  jaxpr = str(jax.make_jaxpr(apply)(params))
  assert ("cond[" in jaxpr) == (path == "fitted")
  assert ("while[" in jaxpr) == (path == "blocks")  # the loop over blocks
  y_BTD, experts_BTA = jax.jit(apply)(params)
  N, p = B * T, nn.unbox(params)
  gates_NA = moe.route(x_BTD.reshape(N, -1) @ p["router"], cfg.top_k)[1]
  y_ref = jax.jit(moe.dispatch_capacity, static_argnums=5)(
      x_BTD.reshape(N, -1), experts_BTA.reshape(N, -1), gates_NA, mask_BT.reshape(N),
      (p["gate"], p["up"], p["down"]), N)
  np.testing.assert_allclose(y_BTD.reshape(N, -1), y_ref, rtol=1e-5, atol=1e-5)


def test_capacity_dispatch_drops_while_training_and_never_when_decoding():
  """cf 0.5, E 4, top-2, N 24: C = 6 of the 12 assignments per expert on average, so training
  drops; a decoding pass (C = N) equals the dropless sort path."""
  cfg = ModelConfig.preset("tiny", capacity_factor=0.5)
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, cfg.d_model)), jnp.float32)
  mask_BT = jnp.ones((2, 12), bool)
  module = moe.MoE(cfg)
  params = module.init(jax.random.key(0), x_BTD, mask_BT)["params"]
  apply = lambda c, decoding: moe.MoE(c).apply({"params": params}, x_BTD, mask_BT,
                                                decoding=decoding)[0]
  dropless = apply(dataclasses.replace(cfg, moe_dispatch="sort"), False)
  np.testing.assert_allclose(apply(cfg, True), dropless, rtol=1e-5, atol=1e-6)
  assert moe.capacity(24, cfg) == 6
  assert np.abs(np.asarray(apply(cfg, False) - dropless)).max() > 1e-2  # dropped assignments


# ----------------------------------------------------------------------------- expert parallel

EP_MESHES = [(2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 2, 4), (1, 4, 2, 1)]


def _ep_layer(cf, B=4, T=8):
  cfg = ModelConfig.preset("tiny", moe_dispatch="expert_parallel", capacity_factor=cf)
  layer = moe.MoE(cfg)
  x_BTD = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
  mask_BT = jnp.arange(T)[None, :] < jnp.array([T, T - 3, T, 2])[:B, None]
  params = layer.init(jax.random.key(0), x_BTD, mask_BT)["params"]
  return cfg, layer, nn.unbox(params), x_BTD, mask_BT


def _ep_loss(layer, params, x_BTD, mask_BT, decoding=False):
  y_BTD, _ = layer.apply({"params": params}, x_BTD, mask_BT, decoding=decoding,
                         mutable=["intermediates"])[0]
  return jnp.sum(jnp.where(mask_BT[..., None], y_BTD, 0.0) * jnp.cos(x_BTD)), y_BTD


def _on_mesh(fn, mesh_shape, params, *args):
  from corpo_jax import sharding  # noqa: PLC0415
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.tree_shardings(
        jax.tree.map(lambda p: p, params), mesh))
    return jax.jit(fn)(params, *args)


@pytest.mark.parametrize("mesh_shape", EP_MESHES)
def test_expert_parallel_layer_equals_one_device_without_drops(mesh_shape):
  """Capacity factor E / top_k: no group can drop, so every mesh gives the one-device layer,
  forward and gradients (params and input)."""
  cfg, layer, params, x, mask = _ep_layer(cf=2.0)
  fn = jax.value_and_grad(lambda p, x: _ep_loss(layer, p, x, mask), argnums=(0, 1), has_aux=True)
  (loss1, y1), g1 = jax.jit(fn)(params, x)
  (loss8, y8), g8 = _on_mesh(fn, mesh_shape, params, x)
  _assert_close((y8, loss8, g8), (y1, loss1, g1))


def _assert_close(got, want):
  """float32 equality up to summation order: rtol 1e-5, and atol 1e-5 of each array's largest
  entry (a sum over devices rounds differently from a sum on one)."""
  close = lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
  jax.tree.map(close, got, want)


def _groups(mesh_shape, N):
  """The token groups of a mesh: the rows split over the batch axes that divide them."""
  from corpo_jax import sharding  # noqa: PLC0415
  spec = sharding.logical_to_spec(("batch",), (N,), dict(zip(sharding.MESH_AXES, mesh_shape)))
  axes = moe._names(spec[0])
  return math.prod(dict(zip(sharding.MESH_AXES, mesh_shape))[a] for a in axes)


def _per_group_reference(cfg, params, x_BTD, mask_BT, groups, C):
  """Capacity dispatch run on each group of tokens by itself (what GShard computes)."""
  x_ND, mask_N = x_BTD.reshape(-1, cfg.d_model), mask_BT.reshape(-1)
  logits_NE = x_ND @ params["router"]
  experts_NA, gates_NA = moe.route(logits_NE, cfg.top_k)
  weights = (params["gate"], params["up"], params["down"])
  split = lambda a: jnp.split(a, groups)
  return jnp.concatenate([moe.dispatch_capacity(x, e, g, m, weights, C) for x, e, g, m in zip(
      split(x_ND), split(experts_NA), split(gates_NA), split(mask_N))]).reshape(x_BTD.shape)


@pytest.mark.parametrize("mesh_shape", EP_MESHES)
def test_expert_parallel_drops_per_device_group_and_never_when_decoding(mesh_shape):
  """capacity_factor 1: each device counts capacity over its own tokens (GShard) and drops what
  overflows there, as the capacity dispatch on each group alone does. Decoding passes size the
  capacity to a group's tokens, so nothing drops and the result is the one-device layer's."""
  cfg, layer, params, x, mask = _ep_layer(cf=1.0)
  groups = _groups(mesh_shape, x.shape[0] * x.shape[1])
  n = x.shape[0] * x.shape[1] // groups
  ref = _per_group_reference(cfg, params, x, mask, groups, moe.capacity(n, cfg))
  full = _per_group_reference(cfg, params, x, mask, 1, x.shape[0] * x.shape[1])
  y8 = _on_mesh(lambda p, x: _ep_loss(layer, p, x, mask)[1], mesh_shape, params, x)
  assert np.abs(np.asarray(ref - full)).max() > 1e-2  # tokens were dropped
  _assert_close(y8, ref)
  y_dec = _on_mesh(lambda p, x: _ep_loss(layer, p, x, mask, decoding=True)[1], mesh_shape, params,
                   x)
  _assert_close(y_dec, full)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4, 1), (1, 1, 2, 4)])
def test_expert_parallel_batch_smaller_than_the_mesh_is_one_group(mesh_shape):
  """2 tokens on a mesh with more batch devices (a decode step of a small batch): one group."""
  cfg, layer, params, x, mask = _ep_layer(cf=2.0, B=2, T=1)
  mask = jnp.ones_like(mask)
  y1 = jax.jit(lambda p, x: _ep_loss(layer, p, x, mask, decoding=True)[1])(params, x)
  y8 = _on_mesh(lambda p, x: _ep_loss(layer, p, x, mask, decoding=True)[1], mesh_shape, params, x)
  _assert_close(y8, y1)
