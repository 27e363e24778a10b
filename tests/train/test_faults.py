"""Numerical guards, bad input and disk faults of the trainer (docs/reliability.md)."""

import errno
import os

import pytest

from configs import grpo as grpo_config
from corpo_jax.train import loop
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import read_jsonl


def _sft_only(workdir, **sft):
  config = grpo_config.get_config("smoke")
  config.workdir = str(workdir)
  config.stages = ("sft",)
  config.eval.tasks = ()
  config.log.progress = False
  config.sft.update(sft)
  return config


@pytest.mark.slow
def test_too_many_skipped_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  # lr 1e30: step 1 applies and blows the parameters up; every later loss is NaN and skipped.
  config = _sft_only(tmp_path, steps=8, checkpoint_every=2, learning_rate=1e30, warmup_steps=0,
                     max_skipped_steps=2)
  with pytest.raises(ValueError, match=r"3 optimizer steps up to step 4 .* more than "
                     r"config\.sft\.max_skipped_steps=2; the last good checkpoint is step 2"):
    loop.run(config)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["skipped"], r["applied"]) for r in rows] == [
      (1, 0, 1.0), (2, 1, 0.0), (3, 2, 0.0), (4, 3, 0.0)]
  assert Checkpointer(str(tmp_path / "checkpoints" / "sft")).all_steps() == [2]


def test_negative_skip_limit_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"config\.sft\.max_skipped_steps=-1 must be >= 0"):
    loop.check_config(_sft_only(tmp_path, max_skipped_steps=-1))
