"""Every field of an RL stage does something: one short RL run with each field away from the
smoke config's value, and each one's effect found in what the run did or wrote. The RLConfig
fields a stage also holds are walked in tests/rl/test_config_fields.py."""

import os
import re
from unittest import mock

import numpy as np
import pytest

from configs import common
from configs import grpo as grpo_config
from corpo_jax import model, sampling
from corpo_jax.rl import rollout
from corpo_jax.train import loop
from corpo_jax.train import setup as setup_lib
from corpo_jax.train.metrics import read_jsonl

# field -> the test below (or elsewhere) that shows it changing what the run does
ELSEWHERE = {
    "kind": "every test that runs an sft stage beside an rl one",
    "max_skipped_steps": "tests/train/test_faults.py::test_too_many_skipped_steps_stop_the_run_and_keep_the_last_good_checkpoint",
}


@pytest.mark.slow
def test_every_rl_stage_field_changes_the_run(tmp_path):
  config = grpo_config.get_config("smoke")
  config.workdir = str(tmp_path)
  config.stages = ("rl",)
  config.eval.tasks = ("arithmetic",)
  config.checkpoint.max_to_keep = 5
  changed = dict(steps=2, tasks=("arithmetic3",), prompts_per_step=4, group_size=2,
                 max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.9, max_thinking_tokens=3,
                 rewards=(("format", 1.0),), checkpoint_every=1, eval_every=1, samples_every=1,
                 max_prompt_len=8, long_prompts="truncate", rollout_layout="decode",
                 stop=("\n\n",))
  # The stage's own fields, and temperature: the sampler's as well as the update's (RLConfig).
  stage_fields = set(common.rl_stage().keys()) - set(setup_lib._RL_FIELDS) | {"temperature"}  # pylint: disable=protected-access
  assert set(changed) | set(ELSEWHERE) == stage_fields, stage_fields ^ (set(changed) | set(ELSEWHERE))
  for field, value in changed.items():
    assert config.rl[field] != value, field  # a change from the smoke config
  config.rl.update(changed)

  calls, copies, stops = [], [], []
  generate, for_decoding, stop_at = sampling.generate, model.for_decoding, rollout.stop_at

  def recording_generate(params, cfg, prompts, mask, **kw):
    calls.append(dict(kw, rows=prompts.shape[0], longest=int(np.asarray(mask).sum(1).max())))
    return generate(params, cfg, prompts, mask, **kw)

  with mock.patch.object(sampling, "generate", recording_generate), \
       mock.patch.object(model, "for_decoding",
                         lambda *a: copies.append(1) or for_decoding(*a)), \
       mock.patch.object(rollout, "stop_at", lambda *a: stops.append(a[-1]) or stop_at(*a)):
    loop.run(config)

  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  train = [c for c in calls if c["num_samples"] == 2]  # the rollouts (evaluation samples 4)
  # steps, prompts_per_step, group_size, max_prompt_len + long_prompts="truncate"
  assert [r["step"] for r in rows] == [1, 2] and len(train) == 2
  assert all(c["rows"] == 4 and c["longest"] == 8 for c in train)  # the last 8 tokens kept
  assert all(r["data/prompts_truncated"] > 0 for r in rows)
  # max_new_tokens, temperature / top_k / top_p, max_thinking_tokens
  assert all(c["max_new_tokens"] == 10 and c["max_thinking_tokens"] == 3 for c in train)
  assert all(c["strategy"] == (sampling.Temperature(0.7), sampling.TopK(5), sampling.TopP(0.9))
             for c in train)
  # rewards: the format reward only
  assert all("reward/format" in r and "reward/exact_match" not in r for r in rows)
  # checkpoint_every 1: step 1 and the final 2 (the smoke config's 2: only 2); eval_every 1
  assert sorted(os.listdir(tmp_path / "checkpoints" / "rl")) == ["1", "2"]
  assert [r["step"] for r in read_jsonl(str(tmp_path / "eval.jsonl"))] == [1, 2]
  # samples_every 1 (two samples a step), of the stage's task: 3-digit problems
  samples = read_jsonl(str(tmp_path / "samples.jsonl"))
  assert [s["step"] for s in samples] == [1, 1, 2, 2]
  assert all(re.search(r"\d{3}", s["prompt"]) for s in samples)
  # rollout_layout "decode": a sampler's copy every step; stop: every rollout cut at "\n\n"
  assert len(copies) == 2 and stops == [("\n\n",)] * 2
