"""Sharding rules, and sharded == single device for the forward pass and the loss gradient."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.data.tokenizer import bundled

_TOK = bundled()  # the special ids the tiny preset was made for
PAD_ID, THINK_START_ID, THINK_END_ID = _TOK.pad_id, _TOK.think_start_id, _TOK.think_end_id


def test_mesh_shape_resolves_one_minus_one_and_rejects_bad_shapes():
  assert sharding.mesh_shape((-1, 2, 1, 1), 8) == (4, 2, 1, 1)
  assert sharding.mesh_shape((2, 2, 2, 1), 8) == (2, 2, 2, 1)
  for bad in [(3, -1, 1, 1), (2, 2, 1, 1), (-1, -1, 1, 1), (8, 1, 1), (0, 8, 1, 1)]:
    with pytest.raises(ValueError, match="mesh"):
      sharding.mesh_shape(bad, 8)


def _fake_devices(n: int, per_slice: int):
  """Stand-ins for TPU devices of n / per_slice slices (mesh_utils reads these attributes)."""
  return [types.SimpleNamespace(id=i, slice_index=i // per_slice, process_index=i // per_slice,
                                platform="cpu", device_kind="cpu") for i in range(n)]


def test_hybrid_devices_keep_each_slice_inside_the_ici_part_of_every_axis():
  # 2 slices of 4: data spans the slices, fsdp x expert stay inside one.
  grid = sharding.hybrid_devices((2, 2, 2, 1), (2, 1, 1, 1), _fake_devices(8, 4))
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert grid.shape == (2, 2, 2, 1)
  np.testing.assert_array_equal(slice_of[0], 0)
  np.testing.assert_array_equal(slice_of[1], 1)
  # 4 slices of 4 over (data 2, fsdp 8): data spans 2 slices, fsdp 2 more; each fsdp group of
  # 4 consecutive entries is one slice.
  grid = sharding.hybrid_devices((2, 8, 1, 1), (2, 2, 1, 1), _fake_devices(16, 4))
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)[:, :, 0, 0]
  np.testing.assert_array_equal(slice_of, [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3]])
  assert sorted(d.id for d in grid.reshape(-1)) == list(range(16))


def test_hybrid_mesh_refuses_what_cannot_be_laid_out():
  with pytest.raises(ValueError, match=r"does not divide mesh=\(1, 8, 1, 1\) along \['data'\]"):
    sharding.hybrid_devices((1, 8, 1, 1), (2, 1, 1, 1), _fake_devices(8, 4))
  with pytest.raises(ValueError, match="spans 4 slices but the 8 devices are in 2 TPU slices"):
    sharding.hybrid_devices((2, 4, 1, 1), (2, 2, 1, 1), _fake_devices(8, 4))
  with pytest.raises(ValueError, match="needs 4 positive sizes"):
    sharding.hybrid_devices((8, 1, 1, 1), (2, 1), _fake_devices(8, 4))
  # These CPU devices have no slice_index and all live in this one process.
  with pytest.raises(ValueError, match="devices are in 1 processes"):
    sharding.make_mesh((2, 4, 1, 1), dcn=(2, 1, 1, 1))
  mesh = sharding.make_mesh((2, 4, 1, 1), dcn=(1, 1, 1, 1))  # one slice: the plain mesh
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}


def test_logical_to_spec_follows_rules_and_drops_non_dividing_axes():
  sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 2}
  assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp", "expert"), None)
  assert sharding.logical_to_spec(("exp", "embed", "mlp"), (4, 64, 128), sizes) == P("expert", "fsdp", "tensor")
  # 6 rows: data divides, then 3 is not divisible by fsdp: keep the longest dividing prefix.
  assert sharding.logical_to_spec(("batch",), (6,), sizes) == P("data")
  assert sharding.logical_to_spec(("vocab", "embed"), (255, 64), sizes) == P(None, "fsdp")
  with pytest.raises(ValueError, match="no_such_axis"):
    sharding.logical_to_spec(("no_such_axis",))


def test_params_are_sharded_as_the_rules_say():
  cfg = model.ModelConfig.preset("tiny")
  mesh = sharding.make_mesh((1, 2, 2, 2))
  params = model.init_params(cfg, jax.random.key(0), mesh)
  layers = params["layers"]
  expect = {  # [L, E, D, F]: experts over 'expert', D over 'fsdp', F over 'tensor'
      "gate": (P(None, "expert", "fsdp", "tensor"), (2, 2, 32, 64)),
      "down": (P(None, "expert", "tensor", "fsdp"), (2, 2, 64, 32)),
      "router": (P(None, "fsdp", None), (2, 32, 4)),
  }
  for name, (spec, shard_shape) in expect.items():
    x = layers["moe"][name]
    assert x.sharding.spec == spec, name
    assert x.addressable_shards[0].data.shape == shard_shape, name
  assert layers["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["attn"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
  assert params["thinking"]["step_head"].sharding.spec == P("fsdp", None)
  assert params["final_norm"]["scale"].sharding.spec == P(None)


def test_a_parameter_dimension_the_mesh_does_not_divide_is_refused_unless_replicated():
  mesh = sharding.make_mesh((1, 2, 2, 2))
  cfg = model.ModelConfig.preset("tiny", vocab_size=1025)  # 1025 rows over tensor 2
  with pytest.raises(ValueError, match=r"does not divide 2 parameter dimension\(s\): "
                     r"\['embed'\] \(1025, 64\) dimension 0 \(vocab\) over mesh axis 'tensor'=2; "
                     r"\['lm_head'\] \(64, 1025\) dimension 1 \(vocab\) over mesh axis "
                     r"'tensor'=2\. .*--config\.model\.indivisible_params=replicate"):
    model.param_shardings(cfg, mesh)
  replicated = model.param_shardings(
      model.ModelConfig.preset("tiny", vocab_size=1025, indivisible_params="replicate"), mesh)
  assert replicated["embed"].spec == P(None, "fsdp")
  assert replicated["lm_head"].spec == P("fsdp", None)
  assert replicated["layers"]["moe"]["gate"].spec == P(None, "expert", "fsdp", "tensor")
  with pytest.raises(ValueError, match="indivisible_params"):
    model.ModelConfig.preset("tiny", indivisible_params="drop")
  # The decode view folds fsdp into tensor (8 here): the tiny model's 4 KV heads do not divide,
  # and the sampler's copy keeps them whole by design.
  train_mesh = sharding.make_mesh((1, 4, 1, 2))
  tiny = model.ModelConfig.preset("tiny")
  with pytest.raises(ValueError, match=r"\['layers'\]\['attn'\]\['k'\] .* \(kv_heads\) over "
                     r"mesh axis 'tensor'=8"):
    model.param_shardings(tiny, sharding.decode_mesh(train_mesh))
  params = model.init_params(tiny, jax.random.key(0), train_mesh)
  decoded, decode_cfg, decode_mesh = model.for_decoding(params, tiny, train_mesh)
  assert decode_cfg.indivisible_params == "replicate" and decode_mesh.shape["tensor"] == 8
  assert decoded["layers"]["attn"]["k"].sharding.spec[2] is None  # 4 KV heads, whole
  assert decoded["layers"]["attn"]["q"].sharding.spec[2] == "tensor"  # 8 query heads, split
  assert decoded["layers"]["attn"]["k"].addressable_shards[0].data.shape[2] == 4


S, E = THINK_START_ID, THINK_END_ID
TOKENS = np.array([
    [PAD_ID, PAD_ID, 9, S, 11, 12, E, 13, 14, S, 15, 16],
    [20, 21, S, 22, 23, 24, E, 25, 26, 27, 28, 29],
    [PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, 30, 31, 32, S, 33, E, 34],
] + [list(range(40 + 12 * i, 52 + 12 * i)) for i in range(5)], np.int32)


def _loss(params, cfg, tokens_BT):
  """Mean next-token log-prob of real tokens plus weighted aux losses; the logits as aux output."""
  out = model.run(params, cfg, tokens_BT)
  logits_BTV = model.project(params, cfg, out.hidden)
  logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :-1]), tokens_BT[:, 1:, None], -1)[..., 0]
  mask_BT = (tokens_BT[:, 1:] != PAD_ID) & (tokens_BT[:, :-1] != PAD_ID)
  loss = (-jnp.sum(logp_BT * mask_BT) / mask_BT.sum()
          + cfg.load_balance_weight * out.aux["load_balance_loss"] + cfg.z_loss_weight * out.aux["z_loss"])
  return loss, logits_BTV


_grad_fn = jax.value_and_grad(_loss, has_aux=True)


def _random_params(cfg):
  """Random parameters built in numpy (an init compile per test would dominate the run time)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.value.shape) + (x.names[-1] == "norm"),
                                            jnp.float32),
                      model.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.cache
def _single_device_result():
  cfg = model.ModelConfig.preset("tiny")
  params = _random_params(cfg)
  return params, jax.jit(_grad_fn, static_argnums=1)(params, cfg, jnp.asarray(TOKENS))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4), (1, 1, 4, 2)])
def test_sharded_forward_and_gradient_equal_single_device(mesh_shape):
  cfg = model.ModelConfig.preset("tiny")
  params, ((loss, logits), grads) = _single_device_result()
  mesh = sharding.make_mesh(mesh_shape)
  p_shard = model.param_shardings(cfg, mesh)
  t_shard = sharding.batch_sharding(mesh, TOKENS.shape)
  with jax.set_mesh(mesh):
    step = jax.jit(_grad_fn, static_argnums=1, in_shardings=(p_shard, t_shard),
                   out_shardings=((sharding.replicated(mesh), None), p_shard))
    (loss_s, logits_s), grads_s = step(jax.device_put(params, p_shard), cfg,
                                       jax.device_put(TOKENS, t_shard))
  assert len(logits_s.sharding.device_set) == 8
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  # Logits about 4 in size; the partitioned capacity dispatch sums each token's two experts in
  # another order than one device: measured up to 1.2e-5 apart on 1 of 24,576 logits.
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_s, grads)
  assert grads_s["layers"]["moe"]["gate"].sharding.spec == p_shard["layers"]["moe"]["gate"].spec
