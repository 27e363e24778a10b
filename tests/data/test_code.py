"""The code task: bundled problems, code extraction, grades from the sandbox, the execution reward."""

import json

import numpy as np
import pytest

from configs import grpo as grpo_config
from corpo_jax.data import tasks
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import code as code_lib
from corpo_jax.rl import rewards
from corpo_jax.train import loop


@pytest.fixture(scope="module")
def task():
  return tasks.get("code", wall_s=2.0)


def _completion(code, trace="Return a + b."):
  return text_lib.completion_text(trace, code)


def test_bundled_problems_split_and_every_reference_solution_passes(task):
  assert (task.size("train"), task.size("eval")) == (20, 4)
  for split in ("train", "eval"):
    for i in range(task.size(split)):
      ex = task.example(split, i)
      assert task.grade(ex.completion(), ex) == 5, ex.key
  names = {task.example(s, i).key for s in ("train", "eval") for i in range(task.size(s))}
  assert len(names) == 24


def test_extract_code_takes_the_first_fenced_block():
  assert code_lib.extract_code("Here:\n```python\nx = 1\n```\nand ```\ny = 2\n```") == "x = 1\n"
  assert code_lib.extract_code("x = 1") == "x = 1"


def test_grades_follow_the_share_of_tests_passed(task):
  ex = next(task.example("train", i) for i in range(20) if task.example("train", i).key == "add")
  cases = {"def add(a, b):\n    return a + b": 5,
           "```python\ndef add(a, b):\n    return a + b\n```": 5,
           "def add(a, b):\n    return 3": 3,  # 1 of 3 tests
           "def add(a, b):\n    return 0": 4,  # add(-4, 4) and add(0, 0): 2 of 3
           "def add(a, b):\n    return a - b + 100": 1,
           "while True: pass": 1}
  for code, grade in cases.items():
    assert task.grade(_completion(code), ex) == grade, code
  # Without </think> the whole text is the answer; an unclosed think block has no answer.
  assert task.grade("def add(a, b):\n    return a + b", ex) == 5
  assert task.grade("<think>def add(a, b):\n    return a + b", ex) == 1


def test_execution_reward_and_hostile_completions_do_not_stop_scoring(task):
  ex = next(task.example("train", i) for i in range(20) if task.example("train", i).key == "add")
  good = _completion("def add(a, b):\n    return a + b")
  hostile = [_completion(c) for c in ("import os\nos.fork()\n" * 3, "x = ' ' * (8 << 30)",
                                      "open('/etc/passwd_copy', 'w')", "import time\ntime.sleep(9)")]
  spec = [("execution", 1.0), ("exact_match", 1.0), ("format", 0.5)]
  scores = rewards.compute(spec, hostile + [good], [ex] * 5, task)
  np.testing.assert_array_equal(scores.components["execution"], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(scores.total_N, [0.5, 0.5, 0.5, 0.5, 2.5])
  assert scores.errors == {"execution": 0, "exact_match": 0, "format": 0}


def test_execution_on_a_non_code_task_is_counted_as_an_error():
  arith = tasks.get("arithmetic")
  ex = arith.example("train", 0)
  scores = rewards.compute([("execution", 1.0), ("format", 1.0)], [ex.completion()], [ex], arith)
  assert scores.errors == {"execution": 1, "format": 0}
  assert scores.components["execution"][0] == 0 and scores.total_N[0] == 1


def test_config_selects_the_code_task_and_rejects_execution_elsewhere():
  config = grpo_config.get_config("smoke")
  config.rl.tasks, config.rl.rewards = ("code",), (("execution", 1.0),)
  loop.check_config(config)
  config.specialize.rewards = (("execution", 1.0),)
  with pytest.raises(ValueError, match=r"config\.specialize\.rewards uses 'execution'.*'arithmetic3'"):
    loop.check_config(config)
  assert grpo_config.get_config().rl.tasks == ("arithmetic",)  # the demo does not use it


def test_malformed_problem_file_names_the_line(tmp_path):
  path = tmp_path / "problems.jsonl"
  good = {"name": "f", "prompt": "p", "solution": "def f(): pass", "tests": ["assert f() is None"]}
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tests": []}) + "\n")
  with pytest.raises(ValueError, match=r"problems\.jsonl:2: .*non-empty list"):
    tasks.get("code", path=str(path))
  path.write_text(json.dumps(good) + "\n")
  with pytest.raises(ValueError, match="no eval problems"):
    tasks.get("code", path=str(path), eval_fraction=0.01).size("eval")
