"""Metrics out of the run: workdir/metrics.jsonl, TensorBoard events, W&B, a progress line, samples.

Device metrics are read one step late (`OneStepLate`): the host queues step k's update, then
fetches step k-1's metrics, which are ready by then, so it never waits on the device.
Only process 0 writes (pass `enabled=False` elsewhere).

Each row's numbers also go to TensorBoard as `<stage>/<key>` at the stage's step, in
workdir/tensorboard/ (`tensorboard --logdir workdir`), written by tensorboardX, a base dependency:
it writes the event files with numpy and protobuf alone and is released regularly.
clu.metric_writers writes through tf.summary (TensorFlow, a second framework beside JAX), and
tensorboard's own TF-free `tensorboard.summary.Writer` is marked experimental and brings the
TensorBoard server's dependencies (grpcio, werkzeug) into every training install.
With config.log.wandb the same numbers go to a Weights & Biases run (`pip install wandb`), which a
rerun of the workdir resumes (its id is kept in workdir/wandb_id).
"""

from __future__ import annotations

import json
import math
import os
import secrets
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


def duration(seconds: float) -> str:
  """A short human duration: 42s, 3m07s, 2h05m."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """The numbers of a row, nested dicts flattened ({"a": {"b": 1}} -> {"a/b": 1}); lists,
  strings, bools and None left out."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, Mapping):
      out.update(_scalars(value, f"{prefix}{key}/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f"{prefix}{key}"] = value  # keys may be ints (pass@k's k)
  return out


def _tensorboard(logdir: str):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    raise ValueError("config.log.tensorboard=True but tensorboardX is not installed: pip install "
                     "tensorboardX (a dependency of corpo_jax: pip install -e .), or pass "
                     "--config.log.tensorboard=False.") from None
  return SummaryWriter(logdir)


def _wandb_run(workdir: str, project: str, name: str, config: Mapping[str, Any] | None):
  """A W&B run for the workdir: the id in workdir/wandb_id, so that a rerun resumes it."""
  try:
    import wandb
  except ImportError:
    raise ValueError("config.log.wandb=True but wandb is not installed: pip install wandb, or "
                     "pass --config.log.wandb=False.") from None
  id_path = os.path.join(workdir, "wandb_id")
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(8)
    with open(id_path, "w") as f:
      f.write(run_id + "\n")
  name = name or os.path.basename(os.path.normpath(workdir))
  return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=workdir,
                    config=dict(config) if config is not None else None)


class MetricsWriter:
  """Appends one JSON row per step to `<workdir>/metrics.jsonl`; the row's numbers also go to
  TensorBoard (`tensorboard`) and to a W&B run (`wandb`: {"project", "name"}) as <stage>/<key>.

  On W&B each stage has its own x axis, `<stage>/step` (W&B's own step only increases).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               wandb: Mapping[str, str] | None = None, run_config: Mapping[str, Any] | None = None,
               filename: str = "metrics.jsonl"):
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._tb = self._wandb = None
    self._wandb_stages: set[str] = set()
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      self._tb = _tensorboard(os.path.join(workdir, "tensorboard"))
    if wandb is not None:
      self._wandb = _wandb_run(workdir, wandb["project"], wandb["name"], run_config)

  @classmethod
  def from_config(cls, config, *, enabled: bool = True) -> "MetricsWriter":
    """The writer config.log asks for, in config.workdir (W&B gets the config as the run's)."""
    log = config.log
    wandb = {"project": log.wandb_project, "name": log.wandb_name} if log.wandb else None
    return cls(config.workdir, enabled=enabled, tensorboard=log.tensorboard, wandb=wandb,
               run_config=config.to_dict())

  def write(self, step: int, stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), "stage": stage, "time": time.time(),
           **{k: _json_safe(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.log_scalars(step, stage, metrics)
    return row

  def log_scalars(self, step: int, stage: str, metrics: Mapping[str, Any]) -> None:
    """The numbers of `metrics` (nested dicts flattened with "/") to TensorBoard and W&B only."""
    if not self.enabled:
      return
    scalars = {f"{stage}/{k}": v for k, v in _scalars(metrics).items()}
    if self._tb is not None:
      for tag, value in scalars.items():
        self._tb.add_scalar(tag, value, step)
    if self._wandb is not None:
      if stage not in self._wandb_stages:
        self._wandb.define_metric(f"{stage}/step")
        self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self._wandb_stages.add(stage)
      self._wandb.log({f"{stage}/step": int(step), **scalars})

  def log_eval(self, step: int, stage: str, rows: list[Mapping[str, Any]]) -> None:
    """Evaluation rows (eval.jsonl's, one per task) to TensorBoard and W&B as
    <stage>/eval/<task>/<key>: accuracy, pass_at_k/<k>, groups/<group>/accuracy, ..."""
    self.log_scalars(step, stage, {"eval": {row["task"]: {k: v for k, v in row.items()
                                                           if k not in ("step", "stage", "task")}
                                            for row in rows}})

  def write_samples(self, step: int, stage: str, samples: list[dict[str, Any]]) -> None:
    if self.enabled:
      with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a") as f:
        for sample in samples:
          f.write(json.dumps({"step": int(step), "stage": stage, **sample}) + "\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _label(key: str) -> str:
  """"reward/mean" -> "reward", "adv/frac_failed_positive" -> "frac_failed_positive"."""
  group, _, name = key.rpartition("/")
  return group if name == "mean" else name


class Progress:
  """A one-line progress display:
  `[stage] step 12/40 |######              | loss 0.31 reward 0.52 3.1 s/it, eta 1m27s`.

  Redraws in place on a terminal; on a pipe or log file prints every `every` steps. The rate
  leaves out the first step shown (it includes compilation) once a later one is in; a resumed
  stage (`start_step`) counts only the steps this process ran.
  """

  def __init__(self, stage: str, total: int, keys: tuple[str, ...], *, enabled: bool = True,
               every: int = 10, stream=None, start_step: int = 0, clock=time.perf_counter):
    self.stage, self.total, self.keys = stage, total, keys
    self.enabled, self.every = enabled, every
    self.stream = stream or sys.stderr
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._clock = clock
    self._marks = [(start_step, clock())]  # (step, time): the start, then the first update

  def seconds_per_step(self, step: int) -> float:
    if len(self._marks) == 1:
      self._marks.append((step, self._clock()))
    (s0, t0), (s1, t1) = self._marks
    if step > s1:  # steps after the first one this process ran
      return (self._clock() - t1) / (step - s1)
    return (t1 - t0) / max(s1 - s0, 1)

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    rate = self.seconds_per_step(step)
    if not self._tty and step % self.every and step != self.total:
      return
    done = min(step, self.total)
    bar = "#" * int(20 * done / max(self.total, 1))
    shown = " ".join(f"{_label(k)} {metrics[k]:.3g}" for k in self.keys
                     if isinstance(metrics.get(k), (int, float)))
    line = (f"[{self.stage}] step {done}/{self.total} |{bar:<20}| {shown} {rate:.2f} s/it, "
            f"eta {duration(rate * (self.total - done))}")
    self.stream.write(("\r" + line) if self._tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._tty:
      self.stream.write("\n")
