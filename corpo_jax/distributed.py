"""Multi-process runs (one JAX process per host, or N processes on one machine): start-up, and how
each process's host data becomes global arrays and back.

Every process runs the same program on one global mesh; arrays that span the mesh are global
jax.Arrays, host data (prompt batches, decoded completions, rewards) lives in each process.

Design (train/loop.py follows it):
- Start-up: `initialize` calls jax.distributed.initialize with the coordinator flags, or with
  no arguments on a Cloud TPU VM (JAX reads the slice's workers from the TPU metadata).
- Data: global batch k is the same for any number of processes. The loaders read one unsharded
  shuffled stream (corpo_jax/data/pipeline.py `batch_rows`); each process loads only the rows
  of each global batch that its devices hold (`process_rows`), and `to_global` assembles the
  global arrays with jax.make_array_from_process_local_data after the processes agree on the
  padded width (the widest local bucket, which is the bucket of the whole batch). So N
  processes train on the same batches, row for row, as one process on the same mesh.
- Rewards: the completions and the prompts' task ids are gathered to every process (`fetch`,
  a few KB per step) and every process scores all rows; the rewards are then identical,
  replicated host arrays, and so are the host metrics. Scoring is duplicated, not split: a
  step's host time is one host scoring the global batch (cheap for the bundled verifiers).
  Evaluation prompts are built on every process alike (replicated inputs) and scored the same way.
- Logging (progress, metrics.jsonl, TensorBoard, eval.jsonl, prints) on process 0 only;
  checkpoints are written by all processes (orbax writes each process's shards; the workdir
  must be a filesystem every process sees).
- A dead process (kill -9, a lost host): JAX's coordination service misses its heartbeats and
  aborts every other process (exit 134) with "Terminating process because the JAX distributed
  service detected fatal errors. This most likely indicates that another task died", naming
  the unhealthy task. Measured on this CPU with 2 processes: ~2 s when process 0 (the
  coordinator) dies, within `heartbeat_timeout_s` (10 s: 6-11 s in 36 kills) when another does,
  whatever the survivor was doing (blocked in a collective included; one that was exchanging
  data with the dead process over gloo first prints gloo's "Connection reset by peer" error).
  Rerunning the same command on every process resumes from the last complete checkpoint.
- CPU (gloo) only: the processes must reach their first cross-process collective within 30 s
  of each other (gloo's context set-up waits 30 s for its peers; jaxlib fixes that timeout).
  On the loaded 2-core test machine a shared persistent compilation cache (one process loading
  executables the other compiled) skewed them past it, so tests do not share one.
"""

from __future__ import annotations

import glob
import importlib.util
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def on_cloud_tpu() -> bool:
  """True on a Cloud TPU VM: libtpu is installed and TPU chips are attached."""
  has_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(has_chips) and importlib.util.find_spec("libtpu") is not None


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, heartbeat_timeout_s: int) -> bool:
  """Starts jax.distributed before any other JAX call; returns whether it did.

  With a coordinator address, all three values are required (N processes anywhere, e.g. on one
  machine with fake CPU devices). Without one, it starts only on a Cloud TPU VM, where JAX
  detects the slice's processes itself.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError(f"--coordinator_address={coordinator_address}, --num_processes="
                     f"{num_processes}, --process_id={process_id}: give all three (or none "
                     f"on a Cloud TPU VM, where they are detected).")
  if coordinator_address is None and not on_cloud_tpu():
    return False
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                     f"{num_processes}).")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


def process_rows(sharding: NamedSharding, num_rows: int) -> np.ndarray:
  """The rows of a [num_rows, ...] array with `sharding` that this process's devices hold,
  ascending: what this process loads (all rows where the batch is replicated)."""
  me = jax.process_index()
  rows = set()
  for device, index in sharding.devices_indices_map((num_rows,)).items():
    if device.process_index == me:
      rows.update(range(num_rows)[index[0]])
  return np.array(sorted(rows), np.int64)


def max_over_processes(n: int) -> int:
  """The largest of every process's `n`."""
  if jax.process_count() == 1:
    return n
  return int(multihost_utils.process_allgather(np.int32(n)).max())


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
              num_rows: int) -> dict[str, jax.Array]:
  """Global [num_rows, ...] arrays from this process's `process_rows` of each field (same
  widths on every process), rows laid out with `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (num_rows,) + v.shape[1:])
          for k, v in batch.items()}


def fetch(tree: Any) -> Any:
  """Numpy copies of whole global arrays on every process (jax.device_get where one process
  holds them all)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
