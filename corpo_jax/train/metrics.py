"""Metrics out of the run: workdir/metrics.jsonl, TensorBoard events, a progress line, samples.

Device metrics are read one step late (`OneStepLate`): the host queues step k's update, then
fetches step k-1's metrics, which are ready by then, so it never waits on the device.
Only process 0 writes (pass `enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device scalars -> Python floats; small arrays -> lists (for JSON)."""
  out = {}
  for key, value in jax.device_get(dict(metrics)).items():
    value = np.asarray(value)
    out[key] = value.item() if value.ndim == 0 else value.tolist()
  return out


class OneStepLate:
  """Holds one step's device metrics until the next step has been queued."""

  def __init__(self):
    self._pending: tuple[int, Any, dict[str, Any]] | None = None

  def push(self, step: int, device_metrics: Any, extra: dict[str, Any] | None = None):
    """Queues this step's metrics; returns the previous step's as (step, host dict) or None."""
    previous, self._pending = self._pending, (step, device_metrics, extra or {})
    return None if previous is None else self._resolve(previous)

  def flush(self):
    previous, self._pending = self._pending, None
    return None if previous is None else self._resolve(previous)

  @staticmethod
  def _resolve(item):
    step, device_metrics, extra = item
    return step, {**to_host(device_metrics), **extra}


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # "nan", "inf": JSON has no literal for them
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


class MetricsWriter:
  """Appends one JSON row per step to `<workdir>/metrics.jsonl` (and TensorBoard if available)."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               filename: str = "metrics.jsonl"):
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional dependency
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), "stage": stage, "time": time.time(),
           **{k: _json_safe(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{stage}/{key}", value, step)
    return row

  def write_samples(self, step: int, stage: str, samples: list[dict[str, Any]]) -> None:
    if self.enabled:
      with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a") as f:
        for sample in samples:
          f.write(json.dumps({"step": int(step), "stage": stage, **sample}) + "\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _label(key: str) -> str:
  """"reward/mean" -> "reward", "adv/frac_failed_positive" -> "frac_failed_positive"."""
  group, _, name = key.rpartition("/")
  return group if name == "mean" else name


class Progress:
  """A one-line progress display: `[stage] step 12/40 |#####     | loss 0.31 reward 0.52 3.1 s/it`.

  Redraws in place on a terminal; on a pipe or log file prints every `every` steps.
  """

  def __init__(self, stage: str, total: int, keys: tuple[str, ...], *, enabled: bool = True,
               every: int = 10, stream=None):
    self.stage, self.total, self.keys = stage, total, keys
    self.enabled, self.every = enabled, every
    self.stream = stream or sys.stderr
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._start = time.perf_counter()

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled or (not self._tty and step % self.every and step != self.total):
      return
    done = min(step, self.total)
    bar = "#" * int(20 * done / max(self.total, 1))
    rate = (time.perf_counter() - self._start) / max(done, 1)
    shown = " ".join(f"{_label(k)} {metrics[k]:.3g}" for k in self.keys
                     if isinstance(metrics.get(k), (int, float)))
    line = f"[{self.stage}] step {done}/{self.total} |{bar:<20}| {shown} {rate:.2f} s/it"
    self.stream.write(("\r" + line) if self._tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._tty:
      self.stream.write("\n")
