"""Write a Python function; graded by calling it in the sandbox (corpo_jax/sandbox.py).

Problems are rows `{"name", "prompt", "solution", "function", "tests": [{"args": [...],
"expected": value}, ...], "trace"}` of a JSON-lines file; the default is the bundled set
(corpo_jax/data/assets/code_problems.jsonl, 24 small functions with 3-4 tests each). A test
calls `function(*args)` (JSON arguments) and passes if the return value equals `expected` as
JSON (sandbox._same: True != 1; 3 == 3.0). The expected values never enter the sandbox: the
trainer compares. The model's code is the answer part of its completion (the text after
`</think>`, text.split_completion), taken from the first ``` fenced block if it has one:

    <think>
    Euclid: replace (a, b) by (b, a % b) until b is 0.
    </think>
    def gcd(a, b):
        while b:
            a, b = b, a % b
        return a

Grade (1..5) from the share of tests passed: 5 all, >= 2/3 -> 4, >= 1/3 -> 3, > 0 -> 2, none
(or no code, or the sandbox stopped it, or the report was malformed) -> 1. tau = 5.
`execution(completion, example)` is the sandbox's Result (the `execution` reward is its pass
fraction); results of the last few hundred distinct (code, problem) pairs are cached so several
rewards of one completion run it once. `run_counts()` counts the sandbox runs by status
("malformed": a solution tampered with the runner's report) for the caller to log.

The task refuses to start on a machine where the sandbox cannot create namespaces (then the
code would run with the host's filesystem visible and writable wherever the sandbox uid may
write, behind seccomp and an audit hook only) unless `allow_unsandboxed=True`
(config.tasks.<name>.allow_unsandboxed) accepts that risk.
Eval rows: a hash of the problem name puts `eval_fraction` of the problems in eval.
"""

from __future__ import annotations

import collections
import re
from importlib import resources

from corpo_jax import sandbox
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import base
from corpo_jax.data.tasks.jsonl import read_numbered

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)```", re.DOTALL)
_CACHE_SIZE = 512


def bundled_path() -> str:
  return str(resources.files("corpo_jax.data").joinpath("assets/code_problems.jsonl"))


def extract_code(answer: str) -> str:
  """The code of an answer: its first fenced block's body, else the whole answer."""
  m = _FENCE.search(answer)
  return m.group(1) if m else answer


_FORMAT = ('{"name": ..., "prompt": ..., "solution": ..., "function": ..., '
           '"tests": [{"args": [...], "expected": ...}]}')


def _check_row(row: dict) -> str | None:
  if not all(isinstance(row.get(k), str) for k in ("name", "prompt", "solution", "function")):
    return 'need string "name", "prompt", "solution" and "function"'
  if not row["function"].isidentifier():
    return f'"function" must be a Python name, not {row["function"]!r}'
  tests = row.get("tests")
  if not isinstance(tests, list) or not tests or not all(
      isinstance(t, dict) and t.keys() == {"args", "expected"} and isinstance(t["args"], list)
      for t in tests):
    return ('"tests" must be a non-empty list of {"args": [...], "expected": value} objects '
            '(code strings such as asserts are not accepted: they ran in the solution\'s '
            'interpreter, which can forge them)')
  if not isinstance(row.get("trace", ""), str):
    return '"trace" must be a string'
  return None


class Code(base.Task):
  name = "code"
  tau = 5

  def __init__(self, path: str = "", eval_fraction: float = 0.25, wall_s: float = 5.0,
               memory_mb: int = 512, allow_unsandboxed: bool = False):
    self.path, self.eval_fraction = path, eval_fraction  # repr: "" for the bundled set
    self._limits = sandbox.Limits(wall_s=wall_s, memory_bytes=memory_mb << 20)
    _check_isolation(allow_unsandboxed)
    file = path or bundled_path()
    rows = read_numbered(file, "code problem file", _FORMAT, _check_row)
    examples = [base.Example(prompt=r["prompt"], answer=r["solution"], trace=r.get("trace", ""),
                             key=r["name"],
                             meta={"function": r["function"], "source": f"{file}:{line}",
                                   "tests": tuple(sandbox.Case(tuple(t["args"]), t["expected"])
                                                  for t in r["tests"])})
                for line, r in rows]
    self._rows = {split: [e for e in examples
                          if base.in_eval_split(e.key, eval_fraction) == (split == "eval")]
                  for split in base.SPLITS}
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._counts = collections.Counter()

  def size(self, split: str) -> int:
    base.check_split(split)
    if not self._rows[split]:
      raise ValueError(f"code task {self.path or bundled_path()!r} has no {split} problems; change eval_fraction="
                       f"{self.eval_fraction} or add problems.")
    return len(self._rows[split])

  def example(self, split: str, index: int) -> base.Example:
    return self._rows[split][index % self.size(split)]

  def execution(self, completion: str, example: base.Example) -> sandbox.Result:
    """The sandbox's verdict on the completion's code against the problem's tests (cached)."""
    code = extract_code(text_lib.split_completion(completion).answer)
    key = (code, example.key)
    if key not in self._cache:
      result = sandbox.run_tests(code, example.meta["function"], example.meta["tests"],
                                 self._limits)
      self._counts[result.status] += 1
      self._cache[key] = result
      if len(self._cache) > _CACHE_SIZE:
        self._cache.popitem(last=False)
    self._cache.move_to_end(key)
    return self._cache[key]

  def run_counts(self) -> dict[str, int]:
    """Sandbox runs so far by Result.status (cache hits not counted), every status present."""
    return {status: self._counts[status] for status in sandbox.STATUSES}

  def grade(self, completion: str, example: base.Example) -> int:
    fraction = self.execution(completion, example).fraction
    if fraction == 1:
      return base.NUM_GRADES
    return 4 if fraction >= 2 / 3 else 3 if fraction >= 1 / 3 else 2 if fraction > 0 else 1

  def final_value(self, text: str) -> str | None:
    code = extract_code(text).strip()
    return code or None


def _check_isolation(allow_unsandboxed: bool) -> None:
  """Fails now, saying what was tried, if this machine cannot run the sandbox, or cannot give
  it namespaces and the config does not accept that."""
  layers = sandbox.isolation()
  if layers["namespaces"] == "none" and not allow_unsandboxed:
    raise ValueError(
        "The code sandbox cannot create namespaces on this machine "
        f"({layers['why_no_namespaces']}), so the model's code would see the host's files "
        "(the project and the problems' solutions included) and could write wherever the "
        f"sandbox's uid ({layers['uid']}) may, stopped only by seccomp ({layers['seccomp']}), "
        "rlimits and an audit hook that code can switch off. Enable unprivileged user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; "
        "util-linux's unshare on PATH), or accept the risk with "
        "--config.tasks.<name>.allow_unsandboxed=True.")
