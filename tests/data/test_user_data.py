"""A user's data: GSM8K-style keys and answer extraction, Parquet and Hugging Face datasets giving
the JSONL rows, named tasks declared by flags, the exact 3:1 weighted mix and its resume, errors
naming file:line and the keys; one RL stage on such a file with a user's reward by reference."""

import collections
import json
import os
import sys
import types
from unittest import mock

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from ml_collections import config_flags

from corpo_jax.data import pipeline, tasks, tokenizer
from corpo_jax.rl import rewards
from corpo_jax.train import loop
from corpo_jax.train import setup as setup_lib
from corpo_jax.train.metrics import read_jsonl

TOK = tokenizer.bundled()
GRPO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "configs", "grpo.py")
GSM = dict(prompt_key="question", answer_key="answer", answer_regex="#### (.*)", reward="numeric")


def _gsm_rows(n=20):
  return [{"question": f"Ann has {i} apples and buys {i + 3} more. How many now?",
           "answer": f"She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3}.\n"
                     f"#### {2 * i + 3}", "id": i} for i in range(n)]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def test_gsm8k_rows_give_the_extracted_answers_and_the_numeric_reward_scores_them(tmp_path):
  task = tasks.get("jsonl", path=_write_jsonl(tmp_path / "gsm.jsonl", _gsm_rows()),
                   eval_fraction=0.0, **GSM)
  assert task.size("train") == 20
  examples = [task.example("train", i) for i in range(20)]
  assert [ex.answer for ex in examples] == [str(2 * i + 3) for i in range(20)]
  assert examples[4].prompt == "Ann has 4 apples and buys 7 more. How many now?"
  assert examples[4].meta["source"].endswith("gsm.jsonl:5") and examples[4].meta["row"]["id"] == 4
  completions = ["<think>\n4 + 7 = 11\n</think>\n11", "<think>\n4 + 7 = 12\n</think>\n12",
                 "<think>\n</think>\nThe answer is 11.0"]
  scores = rewards.compute([("exact_match", 1.0)], completions, [examples[4]] * 3, task)
  np.testing.assert_array_equal(scores.total_N, [1, 0, 1])
  # The RL loader yields those prompts, and examples() gives back their extracted answers.
  batch = next(iter(pipeline.rl_prompts([task], TOK, batch_size=5, seed=0,
                                        shard_options=grain.sharding.NoSharding())))
  got = pipeline.examples(batch, [task], "train")
  assert [ex.answer for ex in got] == [str(2 * int(i) + 3) for i in batch["index"]]
  assert [TOK.decode(t[m]) for t, m in zip(batch["tokens"], batch["token_mask"])] == [
      ex.prompt + "\n" for ex in got]


def test_parquet_and_a_hugging_face_dataset_give_the_jsonl_rows(tmp_path, monkeypatch):
  rows = _gsm_rows()
  keys = dict(GSM, eval_fraction=0.5)
  from_jsonl = tasks.get("jsonl", path=_write_jsonl(tmp_path / "g.jsonl", rows), **keys)
  parquet = _write_parquet(tmp_path / "g.parquet", rows)
  from_parquet = tasks.get("jsonl", path=parquet, **keys)
  loaded = []
  fake = types.ModuleType("datasets")
  fake.load_dataset = lambda *args, **kw: loaded.append((args, kw)) or list(rows)
  monkeypatch.setitem(sys.modules, "datasets", fake)  # the optional package's API, on our rows
  from_hf = tasks.get("jsonl", path="hf:openai/gsm8k:main:train", **keys)
  assert loaded == [(("openai/gsm8k", "main"), {"split": "train"})]
  for split in ("train", "eval"):
    want = [from_jsonl.example(split, i) for i in range(from_jsonl.size(split))]
    for other in (from_parquet, from_hf):
      got = [other.example(split, i) for i in range(other.size(split))]
      assert [(e.prompt, e.answer, e.trace, e.key, e.meta["row"]) for e in got] == [
          (e.prompt, e.answer, e.trace, e.key, e.meta["row"]) for e in want]
  first = from_parquet.example("train", 0)
  assert first.meta["source"] == f"{parquet} row {first.meta['row']['id'] + 1}"
  tasks.get("jsonl", path="hf:gsm8k:test", **GSM)
  assert loaded[-1] == (("gsm8k", None), {"split": "test"})


def test_the_mix_of_two_named_tasks_weighted_3_to_1_is_exact_and_resumes(tmp_path):
  make = lambda weight, n, prefix: tasks.get(
      "jsonl", weight=weight, eval_fraction=0.0, path=_write_jsonl(
          tmp_path / f"{prefix}.jsonl", [{"prompt": f"{prefix} {i}", "answer": i}
                                         for i in range(n)]))
  mixed = [make(3, 7, "a"), make(1, 5, "b")]  # sizes that divide nothing
  loader = lambda seed: pipeline.rl_prompts(mixed, TOK, batch_size=8, seed=seed,
                                            batch_rows=range(8))
  it = iter(loader(0))
  batches = [next(it) for _ in range(50)]  # 400 prompts
  ids = np.concatenate([b["task_id"] for b in batches])
  assert collections.Counter(ids.tolist()) == {0: 300, 1: 100}
  assert ids[:8].tolist() == [0, 0, 1, 0, 0, 0, 1, 0]  # every cycle of 4: a a b a
  # Each task goes through its rows in epochs: every 7 prompts of task a hold each row once.
  index_a = np.concatenate([b["index"][b["task_id"] == 0] for b in batches])
  assert all(sorted(index_a[k:k + 7]) == list(range(7)) for k in range(0, 294, 7))
  again = iter(loader(0))
  np.testing.assert_array_equal(np.concatenate([next(again)["index"] for _ in range(50)]),
                                np.concatenate([b["index"] for b in batches]))
  other = iter(loader(1))
  assert not np.array_equal(next(other)["index"], batches[0]["index"])
  # The iterator state after 20 batches restores to exactly the remaining 30.
  it = iter(loader(0))
  for _ in range(20):
    next(it)
  restored = iter(loader(0))
  restored.set_state(it.get_state())
  for want in batches[20:]:
    got = next(restored)
    np.testing.assert_array_equal(got["task_id"], want["task_id"])
    np.testing.assert_array_equal(got["index"], want["index"])
  with pytest.raises(ValueError, match="Sampler in checkpoint does not match"):
    iter(pipeline.rl_prompts([make(1, 7, "a"), mixed[1]], TOK, batch_size=8, seed=0,
                             batch_rows=range(8))).set_state(it.get_state())


def test_mix_slots_and_bad_weights():
  assert pipeline.mix_slots([3, 1]) == (0, 0, 1, 0)
  assert pipeline.mix_slots([0.5, 0.25, 0.25]) == (0, 1, 2, 0)
  assert pipeline.mix_slots([2.0]) == (0,)
  with pytest.raises(ValueError, match="repeat only after more than 10000 prompts"):
    pipeline.mix_slots([1, 1e-6])
  for weight in (0, -1.0, float("nan"), True):
    with pytest.raises(ValueError, match=f"weight={weight!r} must be a number > 0"):
      tasks.get("verify", weight=weight)


def _parse(*overrides):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  argv = ["main", f"--config={GRPO}:smoke", *overrides]
  with mock.patch.object(sys, "argv", argv):  # config_flags reads its overrides from sys.argv
    values(argv)
  return values.config


def test_flags_declare_named_user_tasks_that_the_trainer_builds(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a {i}", "answer": i} for i in range(9)])
  gsm = _write_jsonl(tmp_path / "gsm.jsonl", _gsm_rows())
  config = _parse(f"--config.tasks.mine.path={a}", "--config.tasks.mine.weight=3",
                  "--config.tasks.gsm.kind=jsonl", f"--config.tasks.gsm.path={gsm}",
                  "--config.tasks.gsm.prompt_key=question",
                  "--config.tasks.gsm.answer_regex=#### (.*)", "--config.rl.tasks=('mine', 'gsm')")
  assert config.tasks.mine.weight == 3.0 and config.tasks.gsm.answer_key == "answer"
  run = types.SimpleNamespace(config=config)  # all Run.task reads
  mine, gsm_task = setup_lib.Run.task(run, "mine"), setup_lib.Run.task(run, "gsm")
  assert mine.weight == 3.0 and gsm_task.weight == 1.0
  assert gsm_task.example("train", 0).answer in {str(2 * i + 3) for i in range(20)}
  with pytest.raises(Exception, match='Did you mean "arithmetic"'):
    _parse("--config.tasks.arithmetc.max_digits=3")


def test_bad_rows_name_file_line_and_the_keys(tmp_path, monkeypatch):
  rows = _gsm_rows(3)
  path = _write_jsonl(tmp_path / "g.jsonl", rows)
  with pytest.raises(ValueError, match=r"g\.jsonl:1: need a key 'prompt' \(prompt_key\) but the "
                     r"row's keys are \['answer', 'id', 'question'\]; set prompt_key"):
    tasks.get("jsonl", path=path)
  parquet = _write_parquet(tmp_path / "g.parquet", rows)
  with pytest.raises(ValueError, match=r"g\.parquet row 1: need a key 'solution' \(answer_key\)"):
    tasks.get("jsonl", path=parquet, prompt_key="question", answer_key="solution")
  _write_jsonl(tmp_path / "g.jsonl", rows[:2] + [{"question": "q", "answer": "no marker"}])
  with pytest.raises(ValueError, match=r"g\.jsonl:3: answer_regex '#### \(\.\*\)' finds no answer "
                     r"in 'no marker'"):
    tasks.get("jsonl", path=path, **GSM)
  with pytest.raises(ValueError, match=r"answer_regex='\(' is not a regular expression"):
    tasks.get("jsonl", path=path, answer_regex="(")
  with pytest.raises(ValueError, match="write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
    tasks.get("jsonl", path="hf:gsm8k")
  monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
  with pytest.raises(ValueError, match="needs the Hugging Face datasets package: pip install "
                                       "datasets"):
    tasks.get("jsonl", path="hf:gsm8k:train")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ValueError, match=r"needs pyarrow: pip install 'corpo_jax\[parquet\]'"):
    tasks.get("jsonl", path=parquet)


USER_REWARD = '''
import json
import os


def short(prompts, completions, answer, **columns):
  assert len(prompts) == len(completions) == len(answer) == len(columns["question"])
  values = [1.0 - len(c) / 100 for c in completions]
  with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
    f.write(json.dumps(values) + "\\n")
  return values
'''


@pytest.mark.slow
def test_one_rl_stage_on_gsm8k_rows_with_a_user_reward(tmp_path, monkeypatch):
  (tmp_path / "gsm_user_reward.py").write_text(USER_REWARD)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _parse(f"--config.workdir={tmp_path / 'run'}", "--config.stages=('rl',)",
                  "--config.rl.steps=2", "--config.rl.tasks=('gsm', 'arithmetic')",
                  "--config.rl.rewards=(('exact_match', 1.0), ('gsm_user_reward:short', 0.5))",
                  f"--config.tasks.gsm.path={_write_jsonl(tmp_path / 'gsm.jsonl', _gsm_rows())}",
                  "--config.tasks.gsm.prompt_key=question", "--config.tasks.gsm.reward=numeric",
                  "--config.tasks.gsm.answer_regex=#### (.*)", "--config.eval.tasks=()",
                  "--config.log.progress=false")
  loop.run(config)
  rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  calls = read_jsonl(str(tmp_path / "calls.jsonl"))  # one call a step, B x G = 2 x 4 values
  assert [r["step"] for r in rows] == [1, 2] and [len(c) for c in calls] == [8, 8]
  for row, values in zip(rows, calls):
    np.testing.assert_allclose(row["reward/gsm_user_reward:short"], np.mean(values), rtol=1e-6)
    assert row["reward/gsm_user_reward:short/errors"] == 0 and row["reward/scoring_failures"] == 0
    assert 0.0 <= row["reward/exact_match"] <= 1.0
