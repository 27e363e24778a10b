"""Full-size Mixtral presets: the sharded forward lowers and compiles ahead of time for a 64-device
mesh (data 2 x fsdp 8 x expert 4 x tensor 1) without allocating any parameter.

conftest.py gives this process 8 fake devices, so the check runs in a subprocess with 64.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, math, sys
import jax, jax.numpy as jnp
import flax.linen as nn
from corpo_jax import model, sharding

mesh = sharding.make_mesh((2, 8, 4, 1))
results = {}
for name, overrides, compile_it in [("mixtral_8x7b", {}, True), ("mixtral_8x22b", {}, True),
                                    ("mixtral_8x7b", {"thinking_layers": 2}, False)]:
  cfg = model.ModelConfig.preset(name, **overrides)
  p_shard = model.param_shardings(cfg, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(model.abstract_params(cfg)), p_shard)
  t_shard = sharding.batch_sharding(mesh, (64, 32))
  tokens = jax.ShapeDtypeStruct((64, 32), jnp.int32, sharding=t_shard)
  with jax.set_mesh(mesh):
    lowered = jax.jit(model.forward, static_argnums=1).lower(params, cfg, tokens)
  per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_shard)))
  per_device += math.prod(t_shard.shard_shape((64, 32))) * 4
  r = {"params": model.count_params(params), "per_device_bytes": per_device}
  if compile_it:
    compiled = lowered.compile()
    r["argument_bytes"] = compiled.memory_analysis().argument_size_in_bytes
    r["output_spec"] = str(compiled.output_shardings.spec)
  results[name + ("_think" if overrides else "")] = r
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def lowered():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=64", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,expected", [("mixtral_8x7b", 46.7e9), ("mixtral_8x22b", 141e9)])
def test_full_size_forward_compiles_sharded_on_64_devices(lowered, name, expected):
  r = lowered[name]
  assert abs(r["params"] - expected) / expected < 0.01
  # Each device holds exactly its shards (float32 params split ~32 ways: fsdp x expert), not a copy.
  assert r["argument_bytes"] == r["per_device_bytes"]
  assert r["argument_bytes"] < 4 * r["params"] / 20
  assert r["output_spec"] == "P(('data', 'fsdp', 'expert'),)"  # logits batch-sharded


def test_full_size_forward_with_thinking_head_lowers(lowered):
  r = lowered["mixtral_8x7b_think"]
  assert r["params"] > lowered["mixtral_8x7b"]["params"] + 2 * 1.4e9  # two more MoE layers
