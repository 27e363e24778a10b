"""Rewards: reference completions score the maximum; hand-written completions score by rubric."""

import json

import hypothesis
import numpy as np
import pytest

from corpo_jax.data import tasks
from corpo_jax.data.tasks import base
from corpo_jax.rl import rewards

ALL = [(name, 1.0) for name in rewards.REWARDS if name not in rewards.TASK_REWARDS]
MAXIMUM = {"exact_match": 1, "ordinal": 5, "format": 1, "quality": 1, "structure": 1,
           "coherence": 1, "alignment": 1, "thinking": 1}


def _jsonl_task(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": f"What is {i} * 2?", "answer": 2 * i,
                                        "trace": f"1. {i} + {i} = {2 * i}.\n2. So #### {2 * i}"})
                            for i in range(40)))
  return tasks.get("jsonl", path=str(path), eval_fraction=0.5)


@pytest.mark.parametrize("name", ["arithmetic", "verify", "jsonl"])
def test_reference_completions_score_the_maximum(name, tmp_path):
  task = _jsonl_task(tmp_path) if name == "jsonl" else tasks.get(name, max_digits=5) \
      if name == "arithmetic" else tasks.get(name)
  examples = [task.example(split, i) for split in ("train", "eval") for i in range(15)]
  scores = rewards.compute(ALL, [ex.completion() for ex in examples], examples, task)
  for reward, value in MAXIMUM.items():
    np.testing.assert_array_equal(scores.components[reward], value, err_msg=reward)
  np.testing.assert_allclose(scores.total_N, sum(MAXIMUM.values()), rtol=1e-6)
  assert scores.num_failed == 0


ARITH = base.Example(prompt="Compute 472 + 59.", answer="531", trace="", key="472+59")
GOOD_TRACE = ("1. Ones: 2 + 9 = 11, write 1, carry 1.\n2. Tens: 7 + 5 + 1 = 13, write 3, carry 1.\n"
              "3. Hundreds: 4 + 0 + 1 = 5, write 5, carry 0.\n4. Answer: 531.")
BAD_TRACE = ("1. Ones: 2 + 9 = 11, write 1, carry 1.\n2. Tens: 7 + 5 + 1 = 12, write 2, carry 1.\n"
             "3. Hundreds: 4 + 0 + 1 = 5, write 5, carry 0.\n4. Answer: 521.")


@pytest.mark.parametrize("completion,expected", [
    # completion -> (exact, ordinal, format, quality, structure, coherence, alignment)
    (f"<think>\n{GOOD_TRACE}\n</think>\n531", (1, 5, 1, 1, 1, 1, 1)),
    (f"<think>\n{BAD_TRACE}\n</think>\n521", (0, 4, 1, 0.75, 1, 2 / 3, 1)),
    (f"<think>\n{BAD_TRACE}\n</think>\n531", (1, 5, 1, 1, 1, 2 / 3, 0)),   # answer disagrees with trace
    (f"<think>\n{GOOD_TRACE}\n</think>\n", (0, 1, 0, 0, 1, 1, 0)),         # no answer
    (f"{GOOD_TRACE}\n531", (1, 5, 0, 1, 0, 0, 0)),                          # no think block
    (f"<think>\n{GOOD_TRACE}", (0, 1, 0, 0, 0, 0, 0)),                     # truncated
    ("<think>\nthe sum is the sum is the sum\n</think>\n500", (0, 3, 1, 0.5, 0, 3 / 6, 0)),  # 3 of 6 3-grams unique
    ("<think>\nFirst, add.\nThen carry.\n</think>\n531", (1, 5, 1, 1, 1, 1, 0)),
    ("<think>\n</think>\n531", (1, 5, 1, 1, 0, 0, 0)),
    ("<think>\n1. x = 531\n</think>\n531", (1, 5, 1, 1, 0, 1, 1)),
    ("", (0, 1, 0, 0, 0, 0, 0)),
    ("<think><think></think></think>\x00\ufffd 531", (1, 5, 0, 1, 0, 0, 0)),
])
def test_arithmetic_rubric(completion, expected):
  names = ["exact_match", "ordinal", "format", "quality", "structure", "coherence", "alignment"]
  scores = rewards.compute([(n, 1.0) for n in names], [completion], [ARITH],
                           tasks.get("arithmetic"))
  got = tuple(float(scores.components[n][0]) for n in names)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  exact = dict(zip(names, expected))
  thinking = (0.3 * exact["coherence"] + 0.2 * exact["structure"] + 0.3 * exact["quality"]
              + 0.2 * exact["alignment"])
  np.testing.assert_allclose(rewards.thinking(completion, ARITH, tasks.get("arithmetic")),
                             thinking, atol=1e-6)


def test_verify_rubric_through_the_registry():
  task = tasks.get("verify")
  ex = base.Example(prompt="p", answer="A: 10 B: 0", trace="", key="k", meta={"truth": (True, False)})
  trace = "1. 23 + 48 = 71.\n2. A is right.\n3. B is wrong.\n4. So A: 9 B: 1."
  answers = ["A: 9 B: 1", "A: 7 B: 4", "A: 9 B: 9", "A: 1 B: 9", "A: nine B: one"]
  completions = [f"<think>\n{trace}\n</think>\n{a}" for a in answers]
  scores = rewards.compute([("ordinal", 1.0), ("alignment", 0.5)], completions, [ex] * 5, task)
  np.testing.assert_array_equal(scores.components["ordinal"], [5, 4, 3, 2, 1])
  np.testing.assert_array_equal(scores.components["alignment"], [1, 0, 0, 0, 0])
  np.testing.assert_allclose(scores.total_N, [5.5, 4, 3, 2, 1])
  assert scores.total_N.dtype == np.float32


def test_weighted_total_and_components():
  comps = ["<think>\n1. 2 + 2 = 4\n2. done 4\n</think>\n4", "nothing"]
  ex = base.Example(prompt="Compute 2 + 2.", answer="4", trace="", key="2+2")
  scores = rewards.compute([("exact_match", 2.0), ("format", 0.5), ("thinking", 1.0)],
                           comps, [ex, ex], [tasks.get("arithmetic")] * 2)
  assert sorted(scores.components) == ["alignment", "coherence", "exact_match", "format",
                                       "quality", "structure", "thinking"]
  np.testing.assert_allclose(scores.components["thinking"], [1.0, 0.0])
  np.testing.assert_allclose(scores.total_N, [2 + 0.5 + 1, 0.0])


class _Broken(base.Task):
  name, tau = "broken", 5

  def example(self, split, index):
    raise NotImplementedError

  def size(self, split):
    return 1

  def grade(self, completion, example):
    if "boom" in completion:
      raise RuntimeError("scoring bug")
    return 5

  def final_value(self, text):
    return None


def test_a_failing_scorer_is_counted_and_scores_the_floor():
  ex = base.Example(prompt="p", answer="1", trace="", key="k")
  scores = rewards.compute([("ordinal", 1.0), ("format", 1.0)],
                           ["<think>a</think>1", "<think>a</think>boom"], [ex, ex], _Broken())
  assert scores.num_failed == 1 and scores.errors == {"ordinal": 1, "format": 0}
  np.testing.assert_array_equal(scores.components["ordinal"], [5, 1])
  np.testing.assert_array_equal(scores.components["format"], [1, 1])  # unaffected
  np.testing.assert_array_equal(scores.total_N, [6, 2])


def test_nan_and_inf_rewards_score_the_floor_per_completion(monkeypatch):
  values = iter([0.5, float("nan"), float("inf"), 1.0])
  monkeypatch.setitem(rewards.REWARDS, "exact_match", lambda c, e, t: next(values))
  ex = base.Example(prompt="p", answer="1", trace="", key="k")
  scores = rewards.compute([("exact_match", 2.0), ("format", 1.0)], ["<think>a</think>1"] * 4,
                           [ex] * 4, tasks.get("arithmetic"))
  np.testing.assert_array_equal(scores.components["exact_match"], [0.5, 0, 0, 1])
  np.testing.assert_array_equal(scores.total_N, [2, 1, 1, 3])
  assert scores.errors == {"exact_match": 2, "format": 0} and scores.num_failed == 2


def test_claims_and_spec_errors():
  assert rewards.claims("2 + 9 = 11, 7 + 5 + 1 = 12, 13 - 8 = 5, 10 - 7 - 1 = 2, x = 3") == [
      True, False, True, True]
  with pytest.raises(ValueError, match="Bad reward entry"):
    rewards.check_spec([("accuracy", 1.0)])
  with pytest.raises(ValueError, match="empty"):
    rewards.check_spec([])
  with pytest.raises(ValueError, match="as many examples"):
    rewards.compute([("format", 1.0)], ["a", "b"], [ARITH], tasks.get("arithmetic"))


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(hypothesis.strategies.text(
    alphabet=hypothesis.strategies.sampled_from(list("<think>/ \n0123456789+-=.AB:#\\boxed{}"))
    | hypothesis.strategies.characters(), max_size=80))
def test_arbitrary_text_never_raises_and_stays_in_range(completion):
  for task, ex in ((tasks.get("arithmetic"), ARITH), (tasks.get("verify"), base.Example(
      prompt="p", answer="A: 10 B: 0", trace="", key="k", meta={"truth": (True, False)}))):
    scores = rewards.compute(ALL, [completion], [ex], task)
    assert scores.num_failed == 0
    assert 1 <= scores.components["ordinal"][0] <= 5
    for name in MAXIMUM:
      if name != "ordinal":
        assert 0 <= scores.components[name][0] <= 1, name


USER_REWARDS = '''
import math

CALLS = []


def length_penalty(prompts, completions, **columns):
  CALLS.append((list(prompts), list(completions), {k: list(v) for k, v in columns.items()}))
  return [-len(c) / 10 for c in completions]


def flaky(prompts, completions, **columns):
  CALLS.append(list(completions))
  if any("boom" in c for c in completions):
    raise RuntimeError("a bug on one completion")
  return [float(a == c) + 0.5 for a, c in zip(columns["answer"], completions)]


def not_finite(prompts, completions, **columns):
  return [float("nan") if c == "nan" else None if c == "none" else 2.0 for c in completions]


def wrong_count(prompts, completions, **columns):
  return [1.0]
'''


def _user_module(tmp_path, monkeypatch, name):
  """A user's reward module `name` (USER_REWARDS) importable from tmp_path."""
  (tmp_path / f"{name}.py").write_text(USER_REWARDS)
  monkeypatch.syspath_prepend(str(tmp_path))
  return __import__(name)


def _row_example(prompt, answer, **row):
  return base.Example(prompt=prompt, answer=answer, trace="", key=prompt,
                      meta={"source": "x.jsonl:1", "row": {"question": prompt, **row}})


def test_user_reward_by_reference_gets_the_batch_and_its_values_are_components(tmp_path,
                                                                              monkeypatch):
  module = _user_module(tmp_path, monkeypatch, "user_rewards_batch")
  examples = [_row_example("What is 6 x 7?", "42", level=1), _row_example("1 + 1?", "2")]
  completions = ["<think>x</think>42", "<think>x</think>3", "<think>xy</think>2"]
  spec = [("user_rewards_batch:length_penalty", 0.5), ("exact_match", 1.0)]
  scores = rewards.compute(spec, completions, [examples[0], examples[0], examples[1]],
                           tasks.get("arithmetic"))
  # One call with the whole batch: prompts, completions, the answer and the rows' other fields.
  assert module.CALLS == [(["What is 6 x 7?", "What is 6 x 7?", "1 + 1?"], completions, {
      "question": ["What is 6 x 7?", "What is 6 x 7?", "1 + 1?"], "level": [1, 1, None],
      "answer": ["42", "42", "2"]})]
  np.testing.assert_allclose(scores.components["user_rewards_batch:length_penalty"],
                             [-1.8, -1.7, -1.8], rtol=1e-6)
  np.testing.assert_array_equal(scores.components["exact_match"], [1, 0, 1])
  np.testing.assert_allclose(scores.total_N, [1 - 0.9, -0.85, 1 - 0.9], rtol=1e-6)
  assert scores.errors == {"user_rewards_batch:length_penalty": 0, "exact_match": 0}


def test_user_reward_that_raises_on_one_completion_scores_the_minimum_there_only(tmp_path,
                                                                                monkeypatch):
  module = _user_module(tmp_path, monkeypatch, "user_rewards_flaky")
  ex = _row_example("q", "7")
  completions = ["7", "8", "boom", "7"]
  scores = rewards.compute([("user_rewards_flaky:flaky", 1.0), ("format", 1.0)], completions,
                           [ex] * 4, tasks.get("arithmetic"))
  # The batch call raised, then one call per completion: only "boom" fails and scores the
  # lowest value the function gave in the batch (0.5); format is unaffected.
  assert module.CALLS == [completions, ["7"], ["8"], ["boom"], ["7"]]
  np.testing.assert_array_equal(scores.components["user_rewards_flaky:flaky"],
                                [1.5, 0.5, 0.5, 1.5])
  assert scores.errors == {"user_rewards_flaky:flaky": 1, "format": 0} and scores.num_failed == 1
  np.testing.assert_array_equal(scores.total_N, [1.5, 0.5, 0.5, 1.5])


def test_user_reward_non_finite_values_and_wrong_counts_are_errors(tmp_path, monkeypatch):
  _user_module(tmp_path, monkeypatch, "user_rewards_values")
  ex = _row_example("q", "7")
  scores = rewards.compute([("user_rewards_values:not_finite", 1.0),
                            ("user_rewards_values:wrong_count", 1.0)],
                           ["a", "nan", "none"], [ex] * 3, tasks.get("arithmetic"))
  np.testing.assert_array_equal(scores.components["user_rewards_values:not_finite"], [2, 2, 2])
  # wrong_count returns one value for the batch of 3 (an error), then one per completion: right.
  np.testing.assert_array_equal(scores.components["user_rewards_values:wrong_count"], [1, 1, 1])
  assert scores.errors == {"user_rewards_values:not_finite": 2,
                           "user_rewards_values:wrong_count": 0} and scores.num_failed == 2


def test_a_reference_that_does_not_import_names_the_module_and_the_function(tmp_path,
                                                                            monkeypatch):
  with pytest.raises(ValueError, match=r"Reward 'no_such_module_x:fn': cannot import module "
                     r"'no_such_module_x' for function 'fn' \(ModuleNotFoundError"):
    rewards.check_spec([("no_such_module_x:fn", 1.0)])
  _user_module(tmp_path, monkeypatch, "user_rewards_names")
  with pytest.raises(ValueError, match=r"module 'user_rewards_names' \(.*user_rewards_names\.py\) "
                     r"has no function 'lenght_penalty'; its functions: \['flaky', "
                     r"'length_penalty', 'not_finite', 'wrong_count'\]"):
    rewards.check_spec([("user_rewards_names:lenght_penalty", 1.0)])
  with pytest.raises(ValueError, match="a user's reward is 'module.path:function'"):
    rewards.check_spec([("user_rewards_names:", 1.0)])
  assert rewards.check_spec([("user_rewards_names:flaky", 2)]) == [
      ("user_rewards_names:flaky", 2.0)]
