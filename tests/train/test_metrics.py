"""Metrics: one-step-late fetching, jsonl rows, TensorBoard events, W&B, progress line."""

import glob
import io
import sys
import types

import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import grpo
from corpo_jax.train import metrics
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


def _run_writer(workdir, **log):
  """The writer a run of configs/grpo.py (defaults plus `log` overrides) makes in `workdir`."""
  config = grpo.get_config()
  config.workdir = str(workdir)
  config.log.update(log)
  return MetricsWriter.from_config(config)


def _write_two_steps(writer):
  writer.write(1, "rl", {"loss": 0.5, "reward/mean": 0.25, "load": [0.5, 0.5], "applied": True})
  writer.write(2, "rl", {"loss": 0.125, "reward/mean": 0.75})
  writer.log_eval(2, "rl", [{"step": 2, "stage": "rl", "task": "arithmetic", "accuracy": 0.375,
                             "pass_at_k": {1: 0.375, 4: 0.625}, "accuracy_thinking": None}])


def test_a_runs_writer_writes_tensorboard_events_by_default(tmp_path):
  writer = _run_writer(tmp_path)
  _write_two_steps(writer)
  writer.close()
  assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 1
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
             for tag in events.Tags()["scalars"]}
  assert scalars == {"rl/loss": [(1, 0.5), (2, 0.125)], "rl/reward/mean": [(1, 0.25), (2, 0.75)],
                     "rl/eval/arithmetic/accuracy": [(2, 0.375)],
                     "rl/eval/arithmetic/pass_at_k/1": [(2, 0.375)],
                     "rl/eval/arithmetic/pass_at_k/4": [(2, 0.625)]}
  assert [r["loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0.5, 0.125]
  assert not (tmp_path / "wandb_id").exists()  # W&B is off unless asked for


def test_tensorboard_asked_for_but_missing_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
  with pytest.raises(ValueError, match=r"tensorboardX is not installed: pip install tensorboardX"):
    _run_writer(tmp_path)
  _run_writer(tmp_path / "off", tensorboard=False).write(1, "rl", {"loss": 1.0})
  assert not (tmp_path / "off" / "tensorboard").exists()


class _FakeWandbRun:
  def __init__(self, calls):
    self.calls = calls

  def define_metric(self, name, **kwargs):
    self.calls.append(("define_metric", name, kwargs))

  def log(self, data):
    self.calls.append(("log", data))

  def finish(self):
    self.calls.append(("finish",))


def _fake_wandb(calls):
  module = types.ModuleType("wandb")
  module.init = lambda **kwargs: calls.append(("init", kwargs)) or _FakeWandbRun(calls)
  return module


def test_wandb_logs_the_rows_numbers_and_a_rerun_resumes_its_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
  writer = _run_writer(tmp_path, wandb=True, wandb_name="trial")
  _write_two_steps(writer)
  writer.close()
  (_, init), *rest = calls
  run_id = (tmp_path / "wandb_id").read_text().strip()
  assert len(run_id) == 16
  assert {k: v for k, v in init.items() if k != "config"} == {
      "project": "corpo_jax", "name": "trial", "id": run_id, "resume": "allow",
      "dir": str(tmp_path)}
  assert init["config"]["rl"]["advantage"] == "grpo" and init["config"]["log"]["wandb"] is True
  assert rest == [
      ("define_metric", "rl/step", {}),
      ("define_metric", "rl/*", {"step_metric": "rl/step"}),
      ("log", {"rl/step": 1, "rl/loss": 0.5, "rl/reward/mean": 0.25}),
      ("log", {"rl/step": 2, "rl/loss": 0.125, "rl/reward/mean": 0.75}),
      ("log", {"rl/step": 2, "rl/eval/arithmetic/accuracy": 0.375,
               "rl/eval/arithmetic/pass_at_k/1": 0.375, "rl/eval/arithmetic/pass_at_k/4": 0.625}),
      ("finish",)]
  calls.clear()
  _run_writer(tmp_path, wandb=True, tensorboard=False)  # a rerun in the same workdir
  assert calls[0][1]["id"] == run_id and calls[0][1]["name"] == tmp_path.name


def test_wandb_asked_for_but_missing_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ValueError, match=r"wandb is not installed: pip install wandb"):
    _run_writer(tmp_path, wandb=True, tensorboard=False)


def test_progress_prints_every_n_steps_on_a_pipe():
  out = io.StringIO()
  progress = Progress("rl", 20, ("loss",), every=10, stream=out)
  for step in range(1, 21):
    progress.update(step, {"loss": 1.0 / step})
  lines = out.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("[rl] step 10/20 |##########          | loss 0.1 ")
  assert lines[1].startswith("[rl] step 20/20 |####################| loss 0.05 ")


def test_progress_eta_leaves_out_the_first_step_and_a_resumed_stage_s_earlier_steps():
  """A stage resumed at step 4 of 14 on a fake clock: its first step took 30 s (compilation),
  the next ones 2 s each, so after step 9 the rate is 2 s/it and 5 steps remain: 10 s."""
  now = [100.0]
  out = io.StringIO()
  progress = Progress("rl", 14, ("loss",), every=1, stream=out, start_step=4,
                      clock=lambda: now[0])
  now[0] += 30
  progress.update(5, {"loss": 0.5})  # one step since the start: 30 s/it
  for step in range(6, 10):
    now[0] += 2
    progress.update(step, {"loss": 0.5})
  lines = out.getvalue().splitlines()
  assert lines[0].endswith("30.00 s/it, eta 4m30s")  # 9 steps at 30 s
  assert lines[-1].startswith("[rl] step 9/14 ") and lines[-1].endswith("2.00 s/it, eta 10s")


def test_duration():
  assert [metrics.duration(s) for s in (0, 42.4, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]
