"""rl.reference_dtype: the reference policy as the starting params, or a bfloat16 copy laid out
like them, and the trainer's ownership of the float32 originals (train/loop.py StartParams)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig
from corpo_jax.rl.reference import reference_policy
from corpo_jax.train import logprobs, memory
from corpo_jax.train.setup import StartParams

CFG = ModelConfig.preset("tiny", dtype="bfloat16")


def test_param_reference_is_the_params_themselves():
  params = {"w": jnp.ones((2, 2))}
  assert reference_policy(params, "param") is params


def test_bfloat16_reference_casts_floats_in_place_on_the_mesh():
  mesh = sharding.make_mesh((2, 2, 2, 1))
  params = model.init_params(CFG, jax.random.key(0), mesh)
  params["count"] = jax.device_put(jnp.arange(8, dtype=jnp.int32),
                                   NamedSharding(mesh, P("data")))
  ref = reference_policy(params, "bfloat16")
  for (path, p), r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
    name = jax.tree_util.keystr(path)
    assert r.sharding.is_equivalent_to(p.sharding, p.ndim), name  # each device casts its shard
    if name == "['count']":
      assert r.dtype == jnp.int32 and np.array_equal(r, p)
    else:
      assert r.dtype == jnp.bfloat16, name
      np.testing.assert_array_equal(np.asarray(r, np.float32),
                                    np.asarray(p.astype(jnp.bfloat16), np.float32))
  # Half the bytes on every device, and the abstract copy (the memory estimate) agrees.
  del params["count"], ref["count"]
  assert memory.per_device_bytes(ref) * 2 == memory.per_device_bytes(params)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  assert (memory.per_device_bytes(reference_policy(abstract, "bfloat16"))
          == memory.per_device_bytes(ref))


def test_bfloat16_reference_logprobs_are_the_params_up_to_weight_rounding():
  """With bfloat16 compute the matmuls read bfloat16 weights either way; the float32 router,
  norm scales and logits read rounded weights, so the reference's log-probs move a little."""
  params = model.init_params(CFG, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 1, CFG.vocab_size)
  mask = jnp.ones_like(tokens, bool)
  logp = lambda p: logprobs.token_logprobs(p, CFG, tokens, mask)[0][:, 1:]
  full, cast = logp(params), logp(reference_policy(params, "bfloat16"))
  assert float(jnp.abs(full).mean()) > 5  # about log(1024): a spread-out distribution
  diff = jnp.abs(cast - full)
  print(f"max |d logp| {float(diff.max()):.4f}, mean {float(diff.mean()):.5f}")
  assert 0 < float(diff.max()) < 0.03 and float(diff.mean()) < 0.005


def test_start_params_are_made_once_and_released():
  calls = []
  start = StartParams(lambda: calls.append(1) or {"w": jnp.ones(3)})
  assert start() is start() and calls == [1]
  start.release()
  with pytest.raises(RuntimeError, match="after release"):
    start()


def test_reference_dtype_is_validated():
  with pytest.raises(ValueError, match="reference_dtype='float16' is not one of"):
    RLConfig(reference_dtype="float16")
