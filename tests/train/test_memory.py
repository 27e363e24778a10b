"""Per-device memory estimates: shard bytes by hand, the tiny preset's train state by hand, the
limit's two sources, and the 46.7B Mixtral refused on one CPU device without being allocated."""

import os
import resource
import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import memory, optim
from corpo_jax.train import state as state_lib

GiB = 2**30


def _abstract_state(cfg, mesh):
  return state_lib.abstract_state(cfg, optim.program_optimizer(cfg, RLConfig()), mesh)


class _Device:
  """A stand-in for a jax device: only memory_stats() is read."""

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def _meminfo(tmp_path, monkeypatch, available_kb):
  path = tmp_path / "meminfo"
  path.write_text(f"MemTotal:       33554432 kB\nMemFree:         1000 kB\n"
                  f"MemAvailable:   {available_kb} kB\n")
  monkeypatch.setattr(memory, "MEMINFO", str(path))


def test_per_device_bytes_counts_one_shard_per_device():
  mesh = sharding.make_mesh((4, 2, 1, 1))
  struct = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                           sharding=NamedSharding(mesh, spec))
  tree = {"rows": struct((16, 8), jnp.float32, P(("data", "fsdp"))),  # [2, 8] f32: 64 bytes
          "grid": struct((16, 8), jnp.float32, P("data", "fsdp")),  # [4, 4] f32: 64 bytes
          "replicated": struct((3,), jnp.bfloat16, P()),  # all of it: 6 bytes
          "step": struct((), jnp.int32, P())}  # 4 bytes
  assert memory.per_device_bytes(tree) == 64 + 64 + 6 + 4
  assert memory.per_device_bytes(tree["rows"]) == 64


def test_estimate_of_the_tiny_train_state_by_hand():
  cfg = ModelConfig.preset("tiny")
  # 366144 parameters (update the numbers below if the tiny preset changes), 512 of them in the
  # norm scales, which are replicated; fsdp=8 splits every other leaf's 64-wide embed axis.
  assert model.count_params(model.abstract_params(cfg)) == 366144
  state = _abstract_state(cfg, sharding.make_mesh((1, 8, 1, 1)))
  est = memory.estimate(state, reference_params=state.params)
  params = ((366144 - 512) // 8 + 512) * 4  # float32
  assert est.params == params == 184864
  assert est.opt_state == 2 * params + 2 * 4  # AdamW's mu and nu, its int32 count and the schedule's
  assert est.reference == params
  assert est.total == 739464

  replicated = memory.estimate(_abstract_state(cfg, sharding.make_mesh((8, 1, 1, 1))))
  assert (replicated.params, replicated.opt_state, replicated.reference) == (
      366144 * 4, 2 * 366144 * 4 + 8, 0)
  assert replicated.total == 4393736


def test_host_limit_when_devices_report_no_memory_stats(tmp_path, monkeypatch):
  state = _abstract_state(ModelConfig.preset("tiny"), sharding.make_mesh((1, 8, 1, 1)))
  assert jax.devices()[0].memory_stats() is None  # CPU: every local device shares the host RAM
  _meminfo(tmp_path, monkeypatch, available_kb=8 * 2**20)
  est = memory.estimate(state)  # default devices: the 8 local devices of the state's mesh
  assert (est.limit, est.limit_source) == (GiB, "host MemAvailable / 8 local devices")

  one = _abstract_state(ModelConfig.preset("tiny"), sharding.make_mesh((1, 1, 1, 1),
                                                                       jax.devices()[:1]))
  assert memory.estimate(one).limit_source == "host MemAvailable / 1 local device"
  assert memory.estimate(one).limit == 8 * GiB

  monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "missing"))
  physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert memory.device_limit([_Device(None)] * 4) == (physical // 4,
                                                      "host physical memory / 4 local devices")


def test_device_limit_is_the_smallest_bytes_limit():
  devices = [_Device({"bytes_limit": 16 * GiB, "bytes_in_use": 0}),
             _Device({"bytes_limit": 12 * GiB, "bytes_in_use": 5})]
  assert memory.device_limit(devices) == (12 * GiB, "device memory_stats bytes_limit")
  state = _abstract_state(ModelConfig.preset("tiny"), sharding.make_mesh((1, 8, 1, 1)))
  assert memory.estimate(state, devices=devices).limit == 12 * GiB


def test_describe_and_check_fits_name_the_numbers():
  est = memory.Estimate(params=GiB, opt_state=2 * GiB, reference=GiB, limit=4 * GiB,
                        limit_source="host MemAvailable / 8 local devices")
  assert memory.describe(est) == (
      "per-device memory estimate: params 1.0 GiB + optimizer state 2.0 GiB + reference 1.0 GiB "
      "= 4.0 GiB of 4.0 GiB (host MemAvailable / 8 local devices); activations come on top")
  memory.check_fits(est)  # exactly full fits
  small = memory.Estimate(params=1464576, opt_state=0, reference=0, limit=GiB, limit_source="x")
  assert "params 0.0014 GiB + optimizer state 0 GiB" in memory.describe(small)
  over = memory.Estimate(params=GiB, opt_state=2 * GiB, reference=GiB + 1, limit=4 * GiB,
                         limit_source=memory.DEVICE_SOURCE)
  with pytest.raises(ValueError, match=r"= 4\.0 GiB .* but has 4\.0 GiB \(device memory_stats"):
    memory.check_fits(over)


def test_mixtral_8x7b_is_refused_on_one_cpu_device_from_shapes_alone(tmp_path, monkeypatch):
  """46,702,792,704 float32 parameters: 16 bytes each with AdamW and the reference (696 GiB)
  against this test machine's 24 GiB; nothing is allocated (seconds, no RSS growth)."""
  _meminfo(tmp_path, monkeypatch, available_kb=24 * 2**20)
  t0, rss0_kb = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  cfg = ModelConfig.preset("mixtral_8x7b")
  state = _abstract_state(cfg, sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]))
  est = memory.estimate(state, reference_params=state.params)
  with pytest.raises(ValueError) as e:
    memory.check_fits(est)
  n = 46_702_792_704
  assert model.count_params(model.abstract_params(cfg)) == n
  assert (est.params, est.opt_state, est.reference) == (4 * n, 8 * n + 8, 4 * n)
  assert est.total == 747_244_683_272  # 695.9 GiB
  message = str(e.value)
  for part in ("params 174.0 GiB + optimizer state 348.0 GiB + reference 174.0 GiB = 695.9 GiB",
               "has 24.0 GiB (host MemAvailable / 1 local device)", "activations come on top",
               "fsdp or expert", "param_dtype=bfloat16", "more memory", "smaller model preset"):
    assert part in message, message
  assert time.perf_counter() - t0 < 30
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0_kb < 2**20  # < 1 GiB (kB)
