"""`python -m tests.train.crash_main KIND:STAGE:STEP <corpo_jax.main flags>`: runs the trainer and
SIGKILLs itself at one point, for the kill -9 tests (tests/train/test_loop.py).

KIND "row": right after the metrics row of (STAGE, STEP) is written, once the asynchronous
checkpoint saves started before it are on disk (on a loaded machine a save can still be writing
when the next rows are, and a rerun would then rightly resume from an earlier checkpoint than
the test expects). KIND "save": right after the asynchronous checkpoint save of (STAGE, STEP)
has started, while its files are being written.
"""

import os
import signal
import sys

from absl import app

from corpo_jax import main as main_lib
from corpo_jax.train import checkpoint, metrics


def _crash_after(cls, method: str, hit, settle=lambda: None) -> None:
  original = getattr(cls, method)

  def patched(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if hit(*args):
      settle()
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  setattr(cls, method, patched)


def _saving_checkpointers() -> list[checkpoint.Checkpointer]:
  """The Checkpointers that have started a save in this process (appended to as they do)."""
  saving = []
  save = checkpoint.Checkpointer.save

  def tracked(self, *args, **kwargs):
    saving.append(self)
    return save(self, *args, **kwargs)

  checkpoint.Checkpointer.save = tracked
  return saving


def install(point: str) -> None:
  kind, stage, step = point.split(":")
  if kind == "row":  # MetricsWriter.write(step, stage, metrics)
    saving = _saving_checkpointers()
    hit = lambda k, name, *_: (name, k) == (stage, int(step))
    _crash_after(metrics.MetricsWriter, "write", hit, settle=lambda: [c.wait() for c in saving])
  elif kind == "save":  # Checkpointer.save(step, state, meta, ...)
    _crash_after(checkpoint.Checkpointer, "save",
                 lambda k, state, meta, *_: (meta["stage"], k) == (stage, int(step)))
  else:
    raise ValueError(f"crash point {point!r}: KIND must be row or save")


if __name__ == "__main__":
  install(sys.argv.pop(1))
  app.run(main_lib.main)
