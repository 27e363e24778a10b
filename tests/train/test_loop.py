"""The trainer end to end: the smoke config, kill -9 and resume, SIGTERM, config errors."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import pytest

from configs import common
from configs import corpo as corpo_config
from configs import grpo as grpo_config
from corpo_jax import sharding
from corpo_jax.train import loop
from corpo_jax.train import setup as setup_lib
from corpo_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WALL_CLOCK_KEYS = ("time", "time/step_s", "time/rollout_s", "tokens_per_s")


def _main(workdir, *flags):
  return [sys.executable, "-m", "corpo_jax.main", "--config=configs/grpo.py:smoke",
          f"--config.workdir={workdir}", *flags]


def _rl_only(workdir, steps=6):
  return _main(workdir, "--config.stages=('rl',)", f"--config.rl.steps={steps}",
               "--config.rl.checkpoint_every=2", "--config.eval.tasks=()")


def _wait_for_row(path, stage, step, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stdout.read()}")
    if os.path.exists(path) and any(r["stage"] == stage and r["step"] >= step
                                    for r in read_jsonl(path)):
      return
    time.sleep(0.2)
  raise AssertionError(f"no {stage} row with step >= {step} in {timeout}s")


def _comparable(rows):
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]


@pytest.mark.slow
def test_smoke_config_runs_all_three_stages(tmp_path):
  config = grpo_config.get_config("smoke")
  config.workdir = str(tmp_path)
  calls = []  # (stage, step, sampling rng, params checksum) of every evaluation
  evaluate = loop._evaluate
  def recording(run, params, stage, step, rng, out=None):
    checksum = sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params))
    calls.append((stage, step, tuple(np.asarray(jax.random.key_data(rng)).ravel()), checksum))
    return evaluate(run, params, stage, step, rng, out)
  with mock.patch.object(loop, "_evaluate", recording):
    results = loop.run(config)
  assert list(results) == ["sft", "rl", "specialize"]
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["stage"], r["step"]) for r in rows] == [
      (s, k) for s in ("sft", "rl", "specialize") for k in (1, 2, 3)]
  rl_row = next(r for r in rows if r["stage"] == "rl")
  for key in ("loss", "reward/mean", "adv/frac_failed_positive", "adv/pos_neg_ratio",
              "adv/frac_correctness_mode", "reward/frac_zero_std", "kl", "entropy", "clip_frac",
              "grad_norm", "completion/length_mean", "completion/truncated_frac",
              "load_balance_loss", "tokens_per_s", "skipped", "reward/exact_match/errors",
              "data/prompts_truncated"):
    assert key in rl_row, key
  evals = read_jsonl(str(tmp_path / "eval.jsonl"))
  assert {(r["stage"], r["task"]) for r in evals} == {
      (s, t) for s in ("sft", "rl", "specialize") for t in ("arithmetic", "arithmetic3")}
  for r in evals:
    assert 0.0 <= r["accuracy"] <= 1.0 and set(r["pass_at_k"]) == {"1", "2"}
    assert {"transparency", "structure", "coherence", "alignment"} <= set(r)
  # A rerun of a finished run skips every stage; the eval CLI evaluates its newest checkpoint.
  assert all(rows == [] for rows in loop.run(config).values())
  with mock.patch.object(loop, "_evaluate", recording):
    again = loop.evaluate_workdir(str(tmp_path))
  assert [(r["stage"], r["step"], r["task"]) for r in again] == [
      ("specialize", 3, "arithmetic"), ("specialize", 3, "arithmetic3")]
  rows = read_jsonl(str(tmp_path / "eval.jsonl"))
  assert rows[-2:] == rows[-4:-2] and len(rows) == len(evals) + 2  # it reproduces the last eval
  assert calls[3][:2] == ("specialize", 3) and calls[3][3] == calls[2][3]  # the same params
  # --stage evaluates an earlier stage's checkpoint, here into another file: the sft rows again.
  out = str(tmp_path / "sft_eval.jsonl")
  with mock.patch.object(loop, "_evaluate", recording):
    loop.evaluate_workdir(str(tmp_path), stage="sft", out=out)
  assert calls[-1][:2] == ("sft", 3) and calls[-1][3] == calls[0][3] != calls[2][3]
  assert read_jsonl(out) == evals[:2] and read_jsonl(str(tmp_path / "eval.jsonl")) == rows
  seen = []
  with mock.patch.object(loop, "_evaluate", lambda run, *a: seen.append(run.config.eval) or []):
    loop.evaluate_workdir(str(tmp_path), num_prompts=512)
  saved = json.load(open(tmp_path / "config.json"))["eval"]
  assert seen[0].num_prompts == 512 and saved["num_prompts"] == config.eval.num_prompts == 4
  with pytest.raises(ValueError, match="--stage='rl_typo' is not a stage"):
    loop.evaluate_workdir(str(tmp_path), stage="rl_typo")
  # Every evaluation (each stage's, the eval CLI's) samples with one rng: paired comparisons.
  rngs = {rng for _, _, rng, _ in calls}
  assert len(calls) == 5 and rngs == {
      tuple(np.asarray(jax.random.key_data(loop.eval_rng(config))).ravel())}


def _two_stages(workdir):
  return ["--config=configs/grpo.py:smoke", f"--config.workdir={workdir}",
          "--config.stages=('sft', 'rl')", "--config.sft.steps=4", "--config.rl.steps=4",
          "--config.eval.tasks=()", "--config.log.progress=false"]


def _run_two_stages(workdir, env, *, main="corpo_jax.main", extra=(), check=True):
  return subprocess.run([sys.executable, "-m", main, *extra, *_two_stages(workdir)], cwd=ROOT,
                        env=env, capture_output=True, text=True, check=check)


@pytest.mark.slow
def test_reruns_and_kill_9_resumes_equal_the_uninterrupted_run(tmp_path):
  """An uninterrupted sft + rl run, then (1) the same config and seed again: bit-identical
  metrics; (2) SIGKILL after a random sft step, while rl's step-2 checkpoint is being written,
  and after rl step 3; each rerun resumes from the last complete checkpoint (never the partial
  one) and the finished run's metrics equal the uninterrupted run's. One test, so the reference
  runs once (pytest-xdist sets a module fixture up once per worker). The env keeps the session's
  persistent compilation cache (tests/conftest.py, shared by the workers) and caches every
  program, so the runs after the first skip most compilation."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  _run_two_stages(tmp_path / "ref", env)
  reference = _comparable(read_jsonl(str(tmp_path / "ref" / "metrics.jsonl")))
  assert [(r["stage"], r["step"]) for r in reference] == [
      (s, k) for s in ("sft", "rl") for k in range(1, 5)]

  _run_two_stages(tmp_path / "again", env)
  assert _comparable(read_jsonl(str(tmp_path / "again" / "metrics.jsonl"))) == reference  # exact

  workdir = tmp_path / "killed"
  sft_step = random.Random(0).randint(1, 3)
  outputs = []
  for point in (f"row:sft:{sft_step}", "save:rl:2", "row:rl:3"):
    out = _run_two_stages(workdir, env, main="tests.train.crash_main", extra=(point,), check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr
    outputs.append(out.stderr)
    if point == "save:rl:2":  # killed mid-write: only orbax's temporary directory exists
      assert [p.name for p in (workdir / "checkpoints" / "rl").iterdir()] == [
          "2.orbax-checkpoint-tmp"]
  out = _run_two_stages(workdir, env)
  resumed_sft = "stage sft: resuming from the checkpoint at step 2" in outputs[1]
  assert resumed_sft == (sft_step == 3)  # row 2 is written just before checkpoint 2
  assert "stage rl: resuming" not in outputs[2]  # the partial step-2 checkpoint was not used
  assert "stage rl: resuming from the checkpoint at step 2" in out.stderr
  assert _comparable(read_jsonl(str(workdir / "metrics.jsonl"))) == reference


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(_rl_only(tmp_path, steps=50), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_row(str(tmp_path / "metrics.jsonl"), "rl", 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted" in out
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints" / "rl") if d.isdigit())
  meta = json.load(open(tmp_path / "checkpoints" / "rl" / str(steps[-1]) / "meta" / "metadata"))
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert meta == {"stage": "rl", "step": steps[-1], "done": False}
  assert steps[-1] == max(r["step"] for r in rows) and steps[-1] < 50
  # Before a stage's first step (initialising, compiling) there is nothing to save: SIGTERM ends
  # the process at once instead of waiting for the step (corpo_jax/train/checkpoint.py).
  proc = subprocess.Popen(_rl_only(tmp_path / "early", steps=50), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if "per-device memory estimate" in line:
      break
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  assert proc.wait(timeout=30) == -signal.SIGTERM and time.time() - t0 < 5
  assert not os.path.exists(tmp_path / "early" / "metrics.jsonl")


def _config(**rl):
  config = corpo_config.get_config("smoke")
  for key, value in rl.items():
    config.rl[key] = value
  return config


@pytest.mark.parametrize("overrides,field", [
    ({"scale": "group"}, "config.rl.scale"),
    ({"group_size": 1}, "config.rl.group_size"),
    ({"advantage": "ppo"}, "config.rl.advantage"),
    ({"rewards": (("exactmatch", 1.0),)}, "exactmatch"),
])
def test_incompatible_options_fail_at_start_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    setup_lib.check_config(_config(**overrides))


@pytest.mark.parametrize("overrides,message", [
    ({"prompts_per_step": 3, "group_size": 3}, "prompts_per_step * group_size=9 must be divisible"),
    ({"prompts_per_step": 4, "group_size": 2, "num_micro_batches": 4},
     "config.rl.num_micro_batches=4 to divide the group size G=2"),
    ({"num_micro_batches": 2}, "config.rl.share_prompt=True needs each micro-batch's"),
    ({"num_micro_batches": 2, "share_prompt": False}, None),
    ({}, None),
])
def test_batch_layout_is_checked_at_start_against_the_mesh(overrides, message):
  """2 prompts x 4 samples unless overridden, on a mesh with 8 batch devices (data 2 x fsdp 2 x
  expert 2)."""
  config = _config(**{"prompts_per_step": 2, "group_size": 4, **overrides})
  mesh = sharding.make_mesh((2, 2, 2, 1))
  if message is None:
    setup_lib.check_batch_layout(config, mesh)
  else:
    with pytest.raises(ValueError, match=re.escape(message)):
      setup_lib.check_batch_layout(config, mesh)


def test_eval_k_larger_than_samples_is_rejected():
  config = _config()
  config.eval.ks = (1, 8)
  with pytest.raises(ValueError, match="config.eval.ks"):
    setup_lib.check_config(config)


def test_config_typo_fails_with_a_suggestion(tmp_path):
  out = subprocess.run(_main(tmp_path, "--config.rl.advantge=corpo"), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert "advantage" in out.stderr and "advantge" in out.stderr


def test_config_arg_typo_lists_valid_arguments():
  with pytest.raises(ValueError, match="valid: \\['model', 'reward', 'seed', 'smoke', 'workdir'\\]"):
    grpo_config.get_config("modl=tiny")


def test_every_stage_field_is_an_rl_config_field_or_read_by_the_loop():
  stage = common.rl_stage()
  loop_fields = {"kind", "steps", "tasks", "prompts_per_step", "group_size", "max_new_tokens",
                 "temperature", "top_k", "top_p", "max_thinking_tokens", "rewards",
                 "checkpoint_every", "eval_every", "samples_every", "max_skipped_steps",
                 "max_prompt_len", "long_prompts", "rollout_layout", "stop"}
  rl_fields = set(setup_lib._RL_FIELDS) - set(common.DERIVED_RL_FIELDS)
  assert set(stage.keys()) == loop_fields | rl_fields
