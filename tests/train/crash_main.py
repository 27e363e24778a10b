"""`python -m tests.train.crash_main KIND:STAGE:STEP <corpo_jax.main flags>`: runs the trainer and
SIGKILLs itself at one point, for the kill -9 tests (tests/train/test_loop.py).

KIND "row": right after the metrics row of (STAGE, STEP) is written. KIND "save": right after the
asynchronous checkpoint save of (STAGE, STEP) has started, while its files are being written.
"""

import os
import signal
import sys

from absl import app

from corpo_jax import main as main_lib
from corpo_jax.train import checkpoint, metrics


def _crash_after(cls, method: str, hit) -> None:
  original = getattr(cls, method)

  def patched(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if hit(*args):
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  setattr(cls, method, patched)


def install(point: str) -> None:
  kind, stage, step = point.split(":")
  if kind == "row":  # MetricsWriter.write(step, stage, metrics)
    _crash_after(metrics.MetricsWriter, "write", lambda k, name, *_: (name, k) == (stage, int(step)))
  elif kind == "save":  # Checkpointer.save(step, state, meta, ...)
    _crash_after(checkpoint.Checkpointer, "save",
                 lambda k, state, meta, *_: (meta["stage"], k) == (stage, int(step)))
  else:
    raise ValueError(f"crash point {point!r}: KIND must be row or save")


if __name__ == "__main__":
  install(sys.argv.pop(1))
  app.run(main_lib.main)
