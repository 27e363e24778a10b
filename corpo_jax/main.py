"""Entry point: `python -m corpo_jax.main --config=configs/grpo.py[:args] [--config.x=y ...]`.

Runs the config's stages (corpo_jax/train/loop.py), resuming from `workdir` if a previous run of
the same command stopped early. SIGTERM (preemption) during a stage's steps writes a checkpoint
and exits 0; before that (initialising, compiling: nothing to save) it ends the process at
once (corpo_jax/train/preemption.py).

Multi-process (corpo_jax/distributed.py): on a Cloud TPU VM slice, run the same command on every
worker (jax.distributed starts by itself); elsewhere give every process the coordinator flags,
e.g. two processes on one machine with 4 fake CPU devices each:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m corpo_jax.main --config=... \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=0   # and =1
Only process 0 prints and writes logs; every process writes its checkpoint shards.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from corpo_jax import distributed
from corpo_jax.train import loop, preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (multi-process runs off "
    "Cloud TPU; with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. n-1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 60, "A multi-process run stops this many seconds after a process "
    "stops responding.")


def main(argv):
  del argv
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
    with preemption.terminate_on_sigterm():  # the loop takes SIGTERM over once it can save
      results = loop.run(config)
  except loop.Preempted as e:
    print(f"corpo_jax: {e}; rerun the same command to resume.")
    sys.exit(0)
  except ValueError as e:  # a user's mistake: say what to change, without a traceback
    logging.error("%s", e)
    print(f"corpo_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index():
    return
  workdir = os.path.abspath(config.workdir)
  print(f"corpo_jax: finished {', '.join(config.stages)} in {time.perf_counter() - t0:.0f}s.")
  for stage, rows in results.items():
    for row in rows:
      ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in row["pass_at_k"].items())
      print(f"  after {stage:<10} {row['task']:<10} accuracy {row['accuracy']:.3f}  {ks}")
  present = [f"{n}/" if os.path.isdir(os.path.join(workdir, n)) else n
             for n in sorted(os.listdir(workdir)) if n not in ("config.json", "run.lock")]
  print(f"corpo_jax: results in {workdir}: {', '.join(present)}")


if __name__ == "__main__":
  app.run(main)
