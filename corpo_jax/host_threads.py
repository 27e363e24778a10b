"""Enough XLA:CPU threads for a mesh of fake CPU devices to run its collectives.

XLA:CPU runs all devices of a process on one pool of max(cores, devices) threads (the
environment variable PJRT_NPROC, or NPROC, replaces the core count), and a collective holds its
thread until every device has reached it. The executor may run a loop that contains collectives
at the same time as a collective outside it, so one device can hold two threads in collectives;
with one thread per device another device then waits for a thread forever, the rendezvous times
out after 40 s and the process aborts ("Termination timeout for `collective permute ...`";
the measurements: docs/benchmarks.md, "XLA:CPU threads for fake multi-device meshes").

`ensure()` (called when corpo_jax is imported, before JAX creates its CPU client) gives such a
run 4 threads per fake device unless PJRT_NPROC or NPROC is already set. Real accelerators and
single-device CPU runs are untouched.
"""

from __future__ import annotations

import os
import re

THREADS_PER_DEVICE = 4
_FORCED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def forced_device_count(xla_flags: str) -> int:
  """The last --xla_force_host_platform_device_count in `xla_flags` (XLA keeps the last), or 1."""
  counts = _FORCED.findall(xla_flags)
  return int(counts[-1]) if counts else 1


def ensure(environ=os.environ) -> None:
  """Sets PJRT_NPROC for a mesh of fake CPU devices (module doc) unless it or NPROC is set."""
  devices = forced_device_count(environ.get("XLA_FLAGS", ""))
  if devices > 1 and "PJRT_NPROC" not in environ and "NPROC" not in environ:
    environ["PJRT_NPROC"] = str(max(THREADS_PER_DEVICE * devices, os.cpu_count() or 1))
