"""Bundled and jsonl tasks: determinism, disjoint splits, golden traces, grading rubrics."""

import json

import pytest

from corpo_jax.data import tasks
from corpo_jax.data.tasks import arithmetic, base, verify


@pytest.mark.parametrize("name", ["arithmetic", "verify"])
def test_generators_are_deterministic_per_seed(name):
  a = [tasks.get(name, seed=3).example("train", i) for i in range(20)]
  b = [tasks.get(name, seed=3).example("train", i) for i in range(20)]
  c = [tasks.get(name, seed=4).example("train", i) for i in range(20)]
  assert a == b
  assert sum(x.key != y.key for x, y in zip(a, c)) >= 15


@pytest.mark.parametrize("name", ["arithmetic", "verify"])
def test_train_and_eval_never_share_a_problem(name):
  task = tasks.get(name, eval_fraction=0.2)
  train = [task.example("train", i) for i in range(2000)]
  evals = [task.example("eval", i) for i in range(500)]
  assert not {ex.key for ex in train} & {ex.key for ex in evals}
  assert all(task.in_eval(ex) and base.in_eval_split(ex.key, 0.2) for ex in evals)
  assert not any(task.in_eval(ex) for ex in train)
  assert len({ex.key for ex in evals}) > 150  # many distinct eval problems, not one repeated


def test_arithmetic_single_digit_facts_are_always_train():
  task = tasks.get("arithmetic", min_digits=1, max_digits=2, eval_fraction=0.5)
  evals = [task.example("eval", i) for i in range(300)]
  assert all(ex.meta["a"] >= 10 or ex.meta["b"] >= 10 for ex in evals)
  train = [task.example("train", i) for i in range(600)]
  single = {ex.key for ex in train if ex.meta["a"] < 10 and ex.meta["b"] < 10}
  hashed_to_eval = [k for k in single if base.in_eval_split(k, 0.5)]
  assert len(hashed_to_eval) > 10  # facts the plain hash rule would have held out
  with pytest.raises(ValueError, match="max_digits=1 leaves no held-out problems"):
    tasks.get("arithmetic", min_digits=1, max_digits=1)


def test_arithmetic_golden_traces():
  assert arithmetic.reference_trace(472, "+", 59) == ((
      "1. Ones: 2 + 9 = 11, write 1, carry 1.\n"
      "2. Tens: 7 + 5 + 1 = 13, write 3, carry 1.\n"
      "3. Hundreds: 4 + 0 + 1 = 5, write 5, carry 0.\n"
      "4. Answer: 531."), 531)
  assert arithmetic.reference_trace(503, "-", 78) == ((
      "1. Ones: 13 - 8 = 5, write 5, borrow 1.\n"
      "2. Tens: 10 - 7 - 1 = 2, write 2, borrow 1.\n"
      "3. Hundreds: 5 - 0 - 1 = 4, write 4, borrow 0.\n"
      "4. Answer: 425."), 425)
  assert arithmetic.reference_trace(95, "+", 7)[0].splitlines()[2:] == [
      "3. Hundreds: write the carry 1.", "4. Answer: 102."]


def test_arithmetic_examples_are_correct_and_respect_difficulty():
  task = tasks.get("arithmetic", min_digits=2, max_digits=4)
  for i in range(300):
    ex = task.example("train", i)
    a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
    assert int(ex.answer) == (a + b if op == "+" else a - b) >= 0
    assert 2 <= len(str(max(a, b))) <= 4 and len(str(b)) <= len(str(a))
    assert ex.prompt == f"Compute {a} {op} {b}."


@pytest.mark.parametrize("answer,grade", [
    ("531", 5), ("The answer is 531.", 5), ("#### 531", 5), ("\\boxed{531}", 5),
    ("530", 4),      # 2 of 3 digits right
    ("521", 4),      # 2 of 3
    ("1531", 4),     # 1531 vs 0531: 3 of 4
    ("-531", 4),     # digits right, sign wrong
    ("500", 3),      # 1 of 3
    ("9991", 2),     # 9991 vs 0531: 1 of 4 (< 1/3)
    ("999", 1),      # no digit right
    ("5999", 1),     # 5999 vs 0531: none
    ("abc", 1), ("", 1), ("5.31", 1),
])
def test_arithmetic_partial_credit(answer, grade):
  task = tasks.get("arithmetic")
  ex = base.Example(prompt="Compute 472 + 59.", answer="531", trace="", key="472+59")
  assert task.grade(f"<think>\nx\n</think>\n{answer}", ex) == grade
  assert task.exact(f"<think>\nx\n</think>\n{answer}", ex) == (grade == 5)


@pytest.mark.parametrize("completion,grade", [
    ("<think>\n1. 1.\n2. 2.\n</think>\n707", 5),
    ("707", 5),                                # grading looks at the answer only
    ("<think>\n1. Ones: 3 + 4 = 7", 1),        # truncated inside the trace: no answer
    ("<think>\nx\n</think>\n708", 4),
])
def test_arithmetic_grade_reads_the_answer_part(completion, grade):
  task = tasks.get("arithmetic")
  ex = base.Example(prompt="Compute 673 + 34.", answer="707", trace="", key="673+34")
  assert task.grade(completion, ex) == grade


def _verify_example(truth):
  return base.Example(prompt="p", answer="", trace="", key="k", meta={"truth": truth})


@pytest.mark.parametrize("answer,truth,grade", [
    ("A: 10 B: 0", (True, False), 5),
    ("A: 8 B: 2", (True, False), 5),          # margins 3 and 3: confident
    ("A: 8, B: 3", (True, False), 4),         # margin 2: both right, low confidence
    ("A: 6 B: 4", (True, False), 4),
    ("A: 9 B: 9", (True, False), 3),          # one right
    ("A: 5 B: 0", (True, False), 3),          # 5 is undecided: counts as wrong
    ("A: 0 B: 10", (True, False), 2),         # both wrong
    ("A: 5 B: 5", (False, True), 2),
    ("A: 0 B: 0", (False, False), 5),
    ("A: 10 B: 10", (True, True), 5),
    ("A: 11 B: 0", (True, False), 1),         # out of range
    ("A: 10", (True, False), 1),
    ("B: 0 A: 10", (True, False), 1),
    ("A: 10 B: 0 because", (True, False), 1),
    ("A: 10 B: 0.", (True, False), 5),
])
def test_verify_five_grades(answer, truth, grade):
  task = tasks.get("verify")
  assert task.grade(f"<think>\n1. x\n</think>\n{answer}", _verify_example(truth)) == grade


@pytest.mark.parametrize("completion", [
    "A: 10 B: 0",                              # no think block
    "<think>\n1. x\n</think>\n<think>\n</think>\nA: 10 B: 0",
    "<think>\n1. x\nA: 10 B: 0",
])
def test_verify_malformed_completion_is_grade_1(completion):
  assert tasks.get("verify").grade(completion, _verify_example((True, False))) == 1


def test_verify_examples_match_their_group():
  task = tasks.get("verify")
  groups = {}
  for i in range(400):
    ex = task.example("eval", i)
    groups[ex.group] = groups.get(ex.group, 0) + 1
    shown = [int(line.split(": ")[1]) for line in ex.prompt.splitlines()[1:3]]
    a, op, b = ex.prompt.splitlines()[0][len("Check the answers to "):-1].split()
    result = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert tuple(s == result for s in shown) == tuple(ex.meta["truth"])
    assert ex.group == {(True, True): "both_right", (True, False): "first_right",
                        (False, True): "second_right", (False, False): "both_wrong"}[ex.meta["truth"]]
  assert set(groups) == set(verify.GROUPS) and min(groups.values()) > 60


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_rows_and_splits(tmp_path):
  rows = [json.dumps({"prompt": f"q{i}", "answer": i, "trace": f"1. t{i}"}) for i in range(50)]
  task = tasks.get("jsonl", path=_write(tmp_path / "a.jsonl", rows + [""]), eval_fraction=0.2)
  train = {task.example("train", i).key for i in range(task.size("train"))}
  evals = {task.example("eval", i).key for i in range(task.size("eval"))}
  assert not train & evals and len(train | evals) == 50
  assert evals == {f"q{i}" for i in range(50) if base.in_eval_split(f"q{i}", 0.2)}
  ex = task.example("train", task.size("train"))  # indices wrap around
  assert ex == task.example("train", 0) and ex.answer == str(int(ex.key[1:]))
  separate = tasks.get("jsonl", path=str(tmp_path / "a.jsonl"),
                       eval_path=_write(tmp_path / "b.jsonl", [rows[0]]))
  assert separate.size("train") == 50 and separate.size("eval") == 1


@pytest.mark.parametrize("line,message", [
    ("{not json", "a.jsonl:2: invalid JSON"),
    ('["prompt"]', "a.jsonl:2: need an object"),
    ('{"prompt": "q"}', r"a.jsonl:2: need a key 'answer' \(answer_key\) but the row's keys are "
                        r"\['prompt'\]; set answer_key to one of them"),
    ('{"prompt": 3, "answer": "x"}', r"a.jsonl:2: need a string under 'prompt' \(prompt_key\), "
                                     "not int"),
    ('{"prompt": "q", "answer": true}', r"a.jsonl:2: need a string or number under 'answer'"),
    ('{"prompt": "q", "answer": "x", "trace": 3}', 'a.jsonl:2: "trace" must be a string'),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "a.jsonl", ['{"prompt": "q", "answer": "1"}', line])
  with pytest.raises(ValueError, match=message):
    tasks.get("jsonl", path=path)


def test_jsonl_missing_file_and_bad_reward(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tasks.get("jsonl", path=str(tmp_path / "nope.jsonl"))
  with pytest.raises(ValueError, match="reward='f1'"):
    tasks.get("jsonl", path=_write(tmp_path / "a.jsonl", ['{"prompt": "q", "answer": 1}']),
              reward="f1")


@pytest.mark.parametrize("reward,reference,answer,correct", [
    ("exact_match", "42", "#### 42", True),
    ("exact_match", "42", "\\boxed{42}", True),
    ("exact_match", "42", "so it is 42.", True),
    ("exact_match", "42", "42.0", True),
    ("exact_match", "#### 1,000", "1000", True),
    ("exact_match", "42", "43", False),
    ("exact_match", "42", "42.001", False),
    ("exact_match", "Paris", "Paris.", True),
    ("exact_match", "Paris", "#### Paris", True),
    ("exact_match", "Paris", "London", False),
    ("exact_match", "42", "", False),
    ("numeric", "3.14159", "3.14159", True),
    ("numeric", "100", "100.00005", True),     # within 1e-6 * 100
    ("numeric", "100", "100.001", False),
    ("numeric", "Paris", "Paris", False),      # numeric reward needs numbers
])
def test_jsonl_answer_matching(tmp_path, reward, reference, answer, correct):
  task = tasks.get("jsonl", path=_write(tmp_path / "a.jsonl", ['{"prompt": "q", "answer": 1}']),
                   reward=reward)
  ex = base.Example(prompt="q", answer=reference, trace="", key="q")
  assert task.grade(f"<think>x</think>{answer}", ex) == (5 if correct else 1)


def test_unknown_task_and_split():
  with pytest.raises(ValueError, match="Unknown task 'math'"):
    tasks.get("math")
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    tasks.get("arithmetic").example("test", 0)
  with pytest.raises(ValueError, match="max_digits"):
    tasks.get("arithmetic", min_digits=3, max_digits=2)
