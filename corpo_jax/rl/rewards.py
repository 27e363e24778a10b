"""Rewards by name, scored on decoded completions (docs/algorithms.md, "Thinking rewards").

Every reward maps (completion text, Example, Task) to a float:

  exact_match  1 if the task's grade is the top grade (exactly right), else 0.
  ordinal      the task's raw grade 1..5 (corpo_jax/data/tasks). This raw value is what reaches
               the advantage when `rewards=[("ordinal", 1.0)]`, and tau is on the same scale:
               verify tau = 4, arithmetic and jsonl tau = 5 (Task.tau). With a weighted mix,
               tau must be stated on the scale of the weighted sum.
  format       1 if `<think> ... </think>` appears once, at the start, before a non-empty answer.
  quality      the grade normalised to [0, 1]: (grade - 1) / 4 (= exact_match for binary tasks).
  structure    1 if the trace has >= 2 lines starting with a step marker (data/steps.py).
  coherence    share of the trace's checkable claims `a + b (+ c ...) = d` / `a - b ... = d` that
               are true; with no claim, 1 - share of repeated word 3-grams (0 for an empty trace).
  alignment    1 if the result stated on the trace's last line equals the final answer
               (Task.final_value on both), else 0.
  thinking     0.3 coherence + 0.2 structure + 0.3 quality + 0.2 alignment, in [0, 1].
  execution    code task only: share of the problem's unit tests that the code after `</think>`
               passes in the sandbox (corpo_jax/sandbox.py), in [0, 1].

A user's reward is named by reference, "module.path:function" (the module importable, e.g. from
the working directory), and is batched like TRL's:

  fn(prompts, completions, **columns) -> list[float]   (one value per completion)

prompts[i] is the question completion i answers (Example.prompt, before the prompt format),
completions[i] the decoded completion (think block included); columns: `answer` (the reference
answer, after the task's answer_regex) and every other field of the example's row for user data
(corpo_jax/data/tasks/jsonl.py; None where a row lacks it), each a list of N values, so `fn`
takes **kwargs for the columns it does not use. It is logged as reward/<reference>.

A completion without a closed think block has no trace: structure, coherence and alignment are 0.
`compute` takes the configured weighted list and returns R [N] with every component [N] for
logging. Scoring never raises on model output: a reward that raises or returns a non-finite value
on one completion scores its minimum there (0, or 1 for ordinal; for a user's reward the lowest
value it gave in the batch, 0 if none); `Scores.errors` counts these per reward and the other
rewards of that completion are unaffected. A user's reward that raises for the batch (or returns
the wrong number of values) is called again completion by completion to find the failing ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from corpo_jax.data import steps as steps_lib
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import NUM_GRADES, Example, Task

THINKING_WEIGHTS = (("coherence", 0.3), ("structure", 0.2), ("quality", 0.3), ("alignment", 0.2))
_CLAIM = re.compile(r"(\d+(?:\s*[+-]\s*\d+)+)\s*=\s*(-?\d+)")


def _trace(completion: str) -> str | None:
  return text_lib.split_completion(completion).trace


def exact_match(completion: str, example: Example, task: Task) -> float:
  return float(task.exact(completion, example))


def ordinal(completion: str, example: Example, task: Task) -> float:
  return float(task.grade(completion, example))


def format_reward(completion: str, example: Example, task: Task) -> float:
  del example, task
  return float(text_lib.split_completion(completion).well_formed)


def quality(completion: str, example: Example, task: Task) -> float:
  return (task.grade(completion, example) - 1) / (NUM_GRADES - 1)


def structure(completion: str, example: Example, task: Task) -> float:
  del example, task
  trace = _trace(completion)
  return float(trace is not None and steps_lib.count_marked_steps(trace) >= 2)


def claims(trace: str) -> list[bool]:
  """Truth of each arithmetic claim `a + b - c = d` in the trace, in order."""
  out = []
  for lhs, rhs in _CLAIM.findall(trace):
    terms = re.findall(r"[+-]|\d+", lhs)
    value = int(terms[0])
    for op, num in zip(terms[1::2], terms[2::2]):
      value = value + int(num) if op == "+" else value - int(num)
    out.append(value == int(rhs))
  return out


def coherence(completion: str, example: Example, task: Task) -> float:
  del example, task
  trace = _trace(completion)
  if not trace:
    return 0.0
  checked = claims(trace)
  if checked:
    return sum(checked) / len(checked)
  words = trace.split()
  grams = list(zip(words, words[1:], words[2:]))
  return len(set(grams)) / len(grams) if grams else 1.0  # 1 - share of repeated 3-grams


def alignment(completion: str, example: Example, task: Task) -> float:
  del example
  parts = text_lib.split_completion(completion)
  lines = [line for line in (parts.trace or "").splitlines() if line.strip()]
  if not lines:
    return 0.0
  arrived, final = task.final_value(lines[-1]), task.final_value(parts.answer)
  return float(arrived is not None and arrived == final)


def thinking(completion: str, example: Example, task: Task) -> float:
  return sum(w * REWARDS[name](completion, example, task) for name, w in THINKING_WEIGHTS)


def execution(completion: str, example: Example, task: Task) -> float:
  return task.execution(completion, example).fraction  # tasks/code.py Code.execution


REWARDS: dict[str, Callable[[str, Example, Task], float]] = {
    "exact_match": exact_match, "ordinal": ordinal, "format": format_reward,
    "quality": quality, "structure": structure, "coherence": coherence,
    "alignment": alignment, "thinking": thinking, "execution": execution,
}
TASK_REWARDS = {"execution": ("code",)}  # rewards defined for these task kinds only
_FLOOR = {"ordinal": 1.0}  # the lowest value of each reward (0 for the others)


@dataclasses.dataclass(frozen=True)
class Scores:
  """total_N: the weighted sum; components: every reward computed, [N] each (the thinking
  composite's four parts included); errors: per reward, the completions where it raised or was
  not finite; num_failed: completions with at least one such error."""

  total_N: np.ndarray
  components: dict[str, np.ndarray]
  errors: dict[str, int]
  num_failed: int


def is_reference(name: str) -> bool:
  """Whether a reward name is a user's "module.path:function" reference."""
  return ":" in name


@functools.cache
def resolve(reference: str) -> Callable[..., Sequence[float]]:
  """The function a "module.path:function" reference names; ValueError naming the module and
  the function when it does not import."""
  module_name, _, fn_name = reference.partition(":")
  if not module_name or not fn_name or ":" in fn_name:
    raise ValueError(f"Reward {reference!r}: a user's reward is 'module.path:function', e.g. "
                     f"'my_rewards:length_penalty'.")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  (the module's own errors too)
    raise ValueError(f"Reward {reference!r}: cannot import module {module_name!r} for function "
                     f"{fn_name!r} ({type(e).__name__}: {e}); run from the folder that holds "
                     f"it or add that folder to PYTHONPATH.") from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
    raise ValueError(f"Reward {reference!r}: module {module_name!r} ({module.__file__}) has no "
                     f"function {fn_name!r}; its functions: {found}.")
  return fn


def check_spec(spec: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
  """Validates a configured reward list [(name or "module:function", weight), ...]."""
  out = []
  for item in spec:
    if len(item) != 2 or not isinstance(item[0], str) or not (
        item[0] in REWARDS or is_reference(item[0])):
      raise ValueError(f"Bad reward entry {item!r}: need (name, weight) with name one of "
                       f"{sorted(REWARDS)} or a user's 'module.path:function'.")
    if is_reference(item[0]):
      resolve(item[0])
    out.append((str(item[0]), float(item[1])))
  if not out:
    raise ValueError("The reward list is empty; e.g. rewards=[('exact_match', 1.0)].")
  return out


def compute(spec: Sequence[tuple[str, float]], completions: Sequence[str],
            examples: Sequence[Example], tasks: Task | Sequence[Task]) -> Scores:
  """Scores N decoded completions with the weighted rewards `spec`.

  examples[i] (and tasks[i], or one Task for all) is the problem completion i answers.
  """
  spec = check_spec(spec)
  n = len(completions)
  tasks = [tasks] * n if isinstance(tasks, Task) else list(tasks)
  if not len(examples) == len(tasks) == n:
    raise ValueError(f"{n} completions need as many examples ({len(examples)}) and tasks "
                     f"({len(tasks)}).")
  names = [name for name, _ in spec]
  if "thinking" in names:
    names += [name for name, _ in THINKING_WEIGHTS if name not in names]
  values, errors, failed_N = {}, {}, np.zeros(n, bool)
  for name in names:
    if is_reference(name):
      scored = _score_batch(resolve(name), completions, examples)
    else:
      scored = [_score(REWARDS[name], c, e, t) for c, e, t in zip(completions, examples, tasks)]
    ok = [v for v in scored if v is not None]
    floor = _FLOOR.get(name, 0.0) if not is_reference(name) else min(ok, default=0.0)
    values[name] = np.asarray([floor if v is None else v for v in scored], np.float32)
    bad_N = np.asarray([v is None for v in scored], bool)
    errors[name] = int(bad_N.sum())
    failed_N |= bad_N
  total = sum(w * values[name] for name, w in spec).astype(np.float32)
  return Scores(total_N=total, components=values, errors=errors, num_failed=int(failed_N.sum()))


def columns(examples: Sequence[Example]) -> dict[str, list[Any]]:
  """The keyword columns a user's reward gets (module doc): every row field, then `answer`."""
  rows = [ex.meta.get("row", {}) for ex in examples]
  keys = dict.fromkeys(k for row in rows for k in row if k not in ("prompts", "completions"))
  out = {k: [row.get(k) for row in rows] for k in keys}
  out["answer"] = [ex.answer for ex in examples]
  return out


def _score_batch(fn: Callable[..., Sequence[float]], completions: Sequence[str],
                 examples: Sequence[Example]) -> list[float | None]:
  """A user's batched reward on all completions: its finite values, None where it failed; a
  batch call that raises or returns the wrong count falls back to one call per completion."""
  prompts, cols = [ex.prompt for ex in examples], columns(examples)
  values = _finite_values(fn, prompts, list(completions), cols)
  if values is not None:
    return values
  out = []
  for i, completion in enumerate(completions):
    row = {k: v[i:i + 1] for k, v in cols.items()}
    one = _finite_values(fn, prompts[i:i + 1], [completion], row)
    out.append(None if one is None else one[0])
  return out


def _finite_values(fn, prompts: list[str], completions: list[str],
                   cols: dict[str, list]) -> list[float | None] | None:
  """fn's values (None for each one not a finite number), or None if it raised or returned
  another number of values than completions."""
  try:
    values = list(fn(prompts, completions, **cols))
  except Exception:  # pylint: disable=broad-except
    return None
  if len(values) != len(completions):
    return None
  return [_finite(v) for v in values]


def _finite(value: Any) -> float | None:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _score(fn: Callable[[str, Example, Task], float], completion: str, example: Example,
           task: Task) -> float | None:
  """fn's finite value, or None if it raised or was not finite (a scoring bug must not kill
  the step)."""
  try:
    value = fn(completion, example, task)
  except Exception:  # pylint: disable=broad-except
    return None
  return _finite(value)
