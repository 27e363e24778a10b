"""Metrics: one-step-late fetching, jsonl rows, progress line."""

import io

import jax.numpy as jnp

from corpo_jax.train.metrics import MetricsWriter, OneStepLate, Progress, read_jsonl


def test_one_step_late_returns_previous_step():
  late = OneStepLate()
  assert late.push(1, {"loss": jnp.float32(0.5)}) is None
  step, host = late.push(2, {"loss": jnp.float32(0.25)}, {"tokens_per_s": 10.0})
  assert step == 1 and host == {"loss": 0.5}
  step, host = late.flush()
  assert step == 2 and host == {"loss": 0.25, "tokens_per_s": 10.0}
  assert late.flush() is None


def test_writer_appends_rows_with_nan_as_string(tmp_path):
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(1, "rl", {"loss": 0.5, "load": [0.25, 0.75]})
  writer.write(2, "rl", {"loss": float("nan")})
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["stage"], r["loss"]) for r in rows] == [(1, "rl", 0.5), (2, "rl", "nan")]
  assert rows[0]["load"] == [0.25, 0.75]


def test_disabled_writer_writes_nothing(tmp_path):
  MetricsWriter(str(tmp_path / "w"), enabled=False).write(1, "rl", {"loss": 1.0})
  assert not (tmp_path / "w").exists()


def test_progress_prints_every_n_steps_on_a_pipe():
  out = io.StringIO()
  progress = Progress("rl", 20, ("loss",), every=10, stream=out)
  for step in range(1, 21):
    progress.update(step, {"loss": 1.0 / step})
  lines = out.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("[rl] step 10/20 |##########          | loss 0.1 ")
  assert lines[1].startswith("[rl] step 20/20 |####################| loss 0.05 ")
