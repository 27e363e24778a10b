"""The code task: bundled problems, code extraction, grades from the sandbox, the execution reward."""

import json

import numpy as np
import pytest

from configs import grpo as grpo_config
from corpo_jax import evaluate, sandbox
from corpo_jax.data import tasks, tokenizer
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import code as code_lib
from corpo_jax.rl import rewards
from corpo_jax.train import setup as setup_lib

# Wrong code that passed every test of the assert-based runner (docs/reliability.md section 1).
HACKS = {
    "replace exec and compile": "import builtins\nbuiltins.exec = builtins.compile = "
                                "lambda *a, **k: None\n",
    "always-equal result": "class A:\n    def __eq__(self, other):\n        return True\n"
                           "def {function}(*args):\n    return A()\n",
    "forged report": "import os, posix\nos.write = lambda fd, data: (posix.write(fd, "
                     "b'{{\"passed\": 999}}'), len(data))[1]\n",
}


@pytest.fixture(scope="module")
def task():
  return tasks.get("code", wall_s=2.0)


def _completion(code, trace="Return a + b."):
  return text_lib.completion_text(trace, code)


def _all_examples(task):
  return [task.example(s, i) for s in ("train", "eval") for i in range(task.size(s))]


def test_bundled_problems_split_and_every_reference_solution_passes(task):
  assert (task.size("train"), task.size("eval")) == (20, 4)
  for split in ("train", "eval"):
    for i in range(task.size(split)):
      ex = task.example(split, i)
      assert task.grade(ex.completion(), ex) == 5, ex.key
  names = {task.example(s, i).key for s in ("train", "eval") for i in range(task.size(s))}
  assert len(names) == 24


def test_reward_hacks_score_0_on_every_bundled_problem(task):
  examples = _all_examples(task)
  malformed = task.run_counts()["malformed"]
  for name, hack in HACKS.items():
    completions = [_completion(hack.format(function=ex.meta["function"])) for ex in examples]
    scores = rewards.compute([("execution", 1.0), ("exact_match", 1.0)], completions, examples,
                             task)
    assert scores.total_N.tolist() == [0.0] * 24, name
    assert scores.errors == {"execution": 0, "exact_match": 0}
  # The forged reports were counted as malformed (the other hacks fail their calls).
  assert task.run_counts()["malformed"] == malformed + 24


def test_bundled_tests_are_calls_with_expected_json_values(task):
  for ex in _all_examples(task):
    assert ex.meta["function"] == ex.key and len(ex.meta["tests"]) in (3, 4)
    for case in ex.meta["tests"]:
      assert isinstance(case, sandbox.Case) and isinstance(case.args, tuple)
  gcd = next(ex for ex in _all_examples(task) if ex.key == "gcd")
  assert gcd.meta["tests"][0] == sandbox.Case((12, 18), 6)
  is_even = next(ex for ex in _all_examples(task) if ex.key == "is_even")  # was `is True`
  wrong = _completion("def is_even(n):\n    return int(n % 2 == 0)")
  assert task.execution(wrong, is_even).passed == 0  # 1 is not True


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
  setup_lib.check_config(config)
  config.specialize.rewards = (("execution", 1.0),)
  with pytest.raises(ValueError, match=r"config\.specialize\.rewards uses 'execution'.*'arithmetic3'"):
    setup_lib.check_config(config)
  assert grpo_config.get_config().rl.tasks == ("arithmetic",)  # the demo does not use it


def test_malformed_problem_file_names_the_line(tmp_path):
  path = tmp_path / "problems.jsonl"
  good = {"name": "f", "prompt": "p", "solution": "def f(): pass", "function": "f",
          "tests": [{"args": [], "expected": None}]}
  for bad, message in [({"tests": []}, "non-empty list"),
                       ({"tests": ["assert f() is None"]}, "asserts are not accepted"),
                       ({"tests": [{"args": 1, "expected": 2}]}, "non-empty list"),
                       ({"function": "f()"}, "must be a Python name")]:
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
    with pytest.raises(ValueError, match=rf"problems\.jsonl:2: .*{message}"):
      tasks.get("code", path=str(path))
  path.write_text(json.dumps(good) + "\n")
  with pytest.raises(ValueError, match="no eval problems"):
    tasks.get("code", path=str(path), eval_fraction=0.01).size("eval")


def test_without_namespaces_the_task_refuses_unless_allowed(monkeypatch):
  launcher = sandbox._launcher()
  if launcher.namespaces:  # pretend unshare failed here
    launcher = sandbox._Launcher(launcher.command[len(sandbox._UNSHARE):], launcher.seccomp,
                                 ("unshare ...: failed 'Operation not permitted'",))
  monkeypatch.setattr(sandbox, "_launcher", lambda: launcher)
  with pytest.raises(ValueError, match=r"cannot create namespaces on this machine \(unshare .*"
                     r"see the host's files .*allow_unsandboxed=True"):
    tasks.get("code")
  task = tasks.get("code", allow_unsandboxed=True)
  ex = task.example("train", 0)
  assert task.grade(ex.completion(), ex) == 5
  assert "allow_unsandboxed" not in repr(task)  # the data order's identity is unchanged


def test_a_grader_that_raises_does_not_stop_the_evaluation(task, monkeypatch):
  run_tests = sandbox.run_tests

  def failing(code, *args):
    if "boom" in code:
      raise RuntimeError("a grader bug")
    return run_tests(code, *args)

  monkeypatch.setattr(sandbox, "run_tests", failing)
  examples = [task.example("eval", i) for i in range(2)]
  texts = [examples[0].completion(), _completion("boom"), _completion("boom"),
           examples[1].completion()]
  row = evaluate.evaluate_task(lambda prompts, mask, n: texts, tokenizer.bundled(), task,
                               num_prompts=2, num_samples=2, ks=(1, 2), prompts_per_batch=2)
  assert row["grading_errors"] == 2
  assert row["accuracy"] == 0.5 and row["pass_at_k"] == {1: 0.5, 2: 1.0}
