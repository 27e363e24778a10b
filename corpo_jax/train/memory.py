"""Per-device memory of a run's persistent arrays, estimated from shapes before anything exists.

What a device holds between steps: its shard of the parameters, of the optimizer state (AdamW:
two moments laid out like their parameter, in the parameter dtype, plus int32 counts) and of the
reference policy (a frozen copy of the starting parameters, laid out like them; none when the
run keeps no reference). Every device of a NamedSharding holds one shard of
`sharding.shard_shape(shape)`, so the most loaded device holds the sum over leaves of that shard's
bytes (a replicated leaf counts in full on every device). Everything comes from
jax.ShapeDtypeStructs (`jax.eval_shape`), so even a model that cannot fit is never allocated.

The limit per device: the smallest `bytes_limit` that `device.memory_stats()` reports over the
local devices (accelerators); where there is none (CPU, whose devices all share the host's RAM)
the host's MemAvailable divided by the number of local devices that share it. Activations,
gradients and compiler scratch come on top of the estimate, so a run that passes `check_fits`
can still run out of memory; one that fails it cannot run.

Use: `est = estimate(abstract_state, reference_params)`, print `describe(est)`, then
`check_fits(est)` (a ValueError naming the numbers and the fixes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

MEMINFO = "/proc/meminfo"
DEVICE_SOURCE = "device memory_stats bytes_limit"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device (the most loaded one) and the per-device limit they must fit in."""

  params: int
  opt_state: int
  reference: int  # 0 when the run keeps no reference policy
  limit: int
  limit_source: str  # DEVICE_SOURCE or "host MemAvailable / N local devices"

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.reference


def per_device_bytes(tree: Any) -> int:
  """Bytes the most loaded device holds of a pytree of ShapeDtypeStructs (or arrays) that carry a
  NamedSharding: the sum over leaves of shard_shape(shape) * itemsize."""
  def one(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape)
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return sum(one(leaf) for leaf in jax.tree.leaves(tree))


def _local_devices(tree: Any) -> list[Any]:
  """This process's devices among those the leaves' shardings place arrays on."""
  devices = set()
  for leaf in jax.tree.leaves(tree):
    devices |= leaf.sharding.device_set
  return sorted((d for d in devices if d.process_index == jax.process_index()), key=lambda d: d.id)


def _host_bytes() -> tuple[int, str]:
  """(bytes, name): MemAvailable from /proc/meminfo, else the physical memory."""
  try:
    with open(MEMINFO) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "host MemAvailable"  # the value is in kB
  except OSError:
    pass
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host physical memory"


def device_limit(devices: Sequence[Any]) -> tuple[int, str]:
  """(bytes per device, where it came from) for `devices` (module doc)."""
  stats = [d.memory_stats() for d in devices]
  if stats and all(s and "bytes_limit" in s for s in stats):
    return min(int(s["bytes_limit"]) for s in stats), DEVICE_SOURCE
  assert devices, "no local devices to bound the run"
  total, name = _host_bytes()
  n = len(devices)
  return total // n, f"{name} / {n} local device{'s' if n > 1 else ''}"


def estimate(abstract_state: Any, reference_params: Any = None,
             devices: Sequence[Any] | None = None) -> Estimate:
  """The per-device Estimate of a TrainState of ShapeDtypeStructs with shardings (the trainer's
  restore target) and of the reference policy's (None: the run keeps none). `devices`: the
  devices whose memory bounds the run; default this process's devices of the state's mesh."""
  devices = _local_devices(abstract_state) if devices is None else list(devices)
  limit, source = device_limit(devices)
  reference = 0 if reference_params is None else per_device_bytes(reference_params)
  return Estimate(params=per_device_bytes(abstract_state.params),
                  opt_state=per_device_bytes(abstract_state.opt_state), reference=reference,
                  limit=limit, limit_source=source)


def _gib(n: int) -> str:
  g = n / 2**30
  return f"{g:.1f} GiB" if g >= 1 else f"{g:.2g} GiB"


def _sum(est: Estimate) -> str:
  return (f"params {_gib(est.params)} + optimizer state {_gib(est.opt_state)} + reference "
          f"{_gib(est.reference)} = {_gib(est.total)}")


def describe(est: Estimate) -> str:
  """One line for the startup log."""
  return (f"per-device memory estimate: {_sum(est)} of {_gib(est.limit)} ({est.limit_source}); "
          f"activations come on top")


def check_fits(est: Estimate) -> None:
  """Refuses, naming the numbers and the fixes, a run whose arrays exceed the per-device limit."""
  if est.total <= est.limit:
    return
  raise ValueError(
      f"The run cannot fit in memory: each device would hold {_sum(est)} (per-device memory "
      f"estimate, activations come on top) but has {_gib(est.limit)} ({est.limit_source}). "
      f"Use more devices, or a larger mesh over fsdp or expert (e.g. --config.mesh='(-1,8,4,1)') "
      f"so each device holds a smaller shard; set --config.model.param_dtype=bfloat16 (halves "
      f"parameters, moments and reference); run on a machine with more memory; or choose a "
      f"smaller model preset (--config=<config>.py:model=<preset>).")
