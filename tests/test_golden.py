"""Golden one-step tests (nanodo's test_train_step): one SFT step and one RL step of the smoke
config, from the seeded init, with their metrics pinned to the digits this code gives.

If one fails, the numbers of a training step changed. That is right only when the change is
meant to alter the math (a new default, a fixed bug): then rerun with CORPO_JAX_GOLDEN=print to
see the new values, paste them here and say in the commit message what changed them and why.
A refactor (moving code, renaming, restructuring configs) must leave them exactly as they are."""

import os

import pytest

from configs import grpo as grpo_config
from corpo_jax.train import loop
from corpo_jax.train.metrics import read_jsonl

GOLDEN = {  # 2026-12-03, jax 0.10.2, XLA:CPU, 8 fake devices (data 8)
    "sft": {"loss": 7.770528793334961, "nll": 7.569680213928223, "grad_norm": 2.766587495803833,
            "tokens": 328},
    "rl": {"loss": 0.014033346436917782, "kl": 0.0, "entropy": 6.169523239135742,
           "grad_norm": 0.8305881023406982, "reward/mean": 0.125, "completion/length_mean": 24.0,
           "adv/frac_failed_positive": 0.0, "load_balance_loss": 1.0348470211029053,
           "tokens": 192, "clip_frac": 0.0},
}


@pytest.mark.slow
def test_one_sft_and_one_rl_step_of_the_smoke_config(tmp_path):
  config = grpo_config.get_config("smoke")
  config.update(workdir=str(tmp_path), stages=("sft", "rl"))
  config.model.num_layers = 2  # the pinned numbers are of the 2-layer model the smoke config had
  # A reward that differs between random completions, so the advantages are not all 0.
  config.rl.rewards = (("coherence", 1.0),)
  config.sft.steps = config.rl.steps = 1
  config.eval.tasks = ()
  config.log.update(progress=False, tensorboard=False)
  loop.run(config)
  rows = {r["stage"]: r for r in read_jsonl(str(tmp_path / "metrics.jsonl"))}
  got = {stage: {k: rows[stage].get(k) for k in GOLDEN_KEYS[stage]} for stage in GOLDEN_KEYS}
  if os.environ.get("CORPO_JAX_GOLDEN") == "print":
    print(repr(got))
  assert set(got) == set(GOLDEN)
  for stage, values in GOLDEN.items():
    for key, value in values.items():
      assert got[stage][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (
          f"{stage} {key}: {got[stage][key]!r} != golden {value!r} (see this module's docstring)")


GOLDEN_KEYS = {
    "sft": ("loss", "nll", "grad_norm", "tokens"),
    "rl": ("loss", "kl", "entropy", "grad_norm", "reward/mean", "completion/length_mean",
           "adv/frac_failed_positive", "load_balance_loss", "tokens", "clip_frac"),
}
