"""Entry point: `python -m corpo_jax.main --config=configs/grpo.py[:args] [--config.x=y ...]`.

Runs the config's stages (corpo_jax/train/loop.py), resuming from `workdir` if a previous run of
the same command stopped early. SIGTERM (preemption) writes a checkpoint and exits 0.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from corpo_jax.train import checkpoint, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  checkpoint.install_sigterm_handler()
  t0 = time.perf_counter()
  try:
    results = loop.run(config)
  except loop.Preempted as e:
    print(f"corpo_jax: {e}; rerun the same command to resume.")
    sys.exit(0)
  except ValueError as e:  # a user's mistake: say what to change, without a traceback
    logging.error("%s", e)
    print(f"corpo_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(config.workdir)
  print(f"corpo_jax: finished {', '.join(config.stages)} in {time.perf_counter() - t0:.0f}s.")
  for stage, rows in results.items():
    for row in rows:
      ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in row["pass_at_k"].items())
      print(f"  after {stage:<10} {row['task']:<10} accuracy {row['accuracy']:.3f}  {ks}")
  present = [f"{n}/" if os.path.isdir(os.path.join(workdir, n)) else n
             for n in sorted(os.listdir(workdir)) if n != "config.json"]
  print(f"corpo_jax: results in {workdir}: {', '.join(present)}")


if __name__ == "__main__":
  app.run(main)
