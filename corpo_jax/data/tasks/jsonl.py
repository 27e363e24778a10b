"""A user's problems from a JSON-lines file: one `{"prompt", "answer", optional "trace"}` per line.

Rewards (`reward=`): "exact_match" compares the extracted answers as text (numbers compared by
value, so `42.0` matches `42`); "numeric" accepts |pred - ref| <= tolerance * max(1, |ref|).
Answers are extracted with text.extract_answer (`#### X`, `\\boxed{X}`, the last number), falling
back to the whole stripped answer for non-numeric references. Grade 5 correct, 1 otherwise; tau = 5.

Eval rows come from `eval_path` if given, else a hash of the prompt puts `eval_fraction` of the
rows in eval (so the split never depends on row order).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import base

REWARDS = ("exact_match", "numeric")


def read_numbered(path: str, what: str, fmt: str,
                  check: Callable[[Any], str | None]) -> list[tuple[int, dict]]:
  """The objects of a JSON-lines file, one per non-empty line, with their line numbers:
  [(line, object), ...].

  what: the file's role for messages ("jsonl task file"); fmt: one line's expected form;
  check(row) -> None or what is wrong with it. Every error names file:line.
  """
  if not os.path.isfile(path):
    raise ValueError(f"{what} {path!r} does not exist.")
  rows = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      line = decode_line(path, lineno, raw)
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one "
                         f"object like {fmt}.") from None
      problem = check(row) if isinstance(row, dict) else f"need an object like {fmt}"
      if problem:
        raise ValueError(f"{path}:{lineno}: {problem}, got {line.strip()[:80]!r}.")
      rows.append((lineno, row))
  if not rows:
    raise ValueError(f"{what} {path!r} has no rows.")
  return rows


def decode_line(path: str, lineno: int, raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); save the file "
                     f"as UTF-8.") from None


def _check_task_row(row: dict) -> str | None:
  if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), (str, int, float)):
    return 'need an object with a string "prompt" and a string or number "answer"'
  if not isinstance(row.get("trace", ""), str):
    return '"trace" must be a string'
  return None


def read_rows(path: str) -> list[base.Example]:
  """The rows of a user's task file as Examples (meta["source"] = "file:line"); a malformed line
  raises ValueError naming file:line."""
  rows = read_numbered(path, "jsonl task file", '{"prompt": "...", "answer": "..."}',
                       _check_task_row)
  return [base.Example(prompt=row["prompt"], answer=str(row["answer"]), trace=row.get("trace", ""),
                       key=row["prompt"], meta={"source": f"{path}:{line}"}) for line, row in rows]


class Jsonl(base.Task):
  name = "jsonl"
  tau = 5

  def __init__(self, path: str, reward: str = "exact_match", tolerance: float = 1e-6,
               eval_path: str | None = None, eval_fraction: float = 0.1):
    if reward not in REWARDS:
      raise ValueError(f"jsonl reward={reward!r}; choose one of {REWARDS}.")
    self.reward, self.tolerance = reward, tolerance
    rows = read_rows(path)
    if eval_path is None:
      self._rows = {"train": [e for e in rows if not base.in_eval_split(e.key, eval_fraction)],
                    "eval": [e for e in rows if base.in_eval_split(e.key, eval_fraction)]}
    else:
      self._rows = {"train": rows, "eval": read_rows(eval_path)}
    self.path = path

  def size(self, split: str) -> int:
    base.check_split(split)
    if not self._rows[split]:
      raise ValueError(f"jsonl task {self.path!r} has no {split} rows; pass eval_path or "
                       "change eval_fraction.")
    return len(self._rows[split])

  def example(self, split: str, index: int) -> base.Example:
    return self._rows[split][index % self.size(split)]

  def final_value(self, text: str) -> str | None:
    value = text_lib.extract_answer(text)
    return value if value is not None else (text.strip().rstrip(".").strip() or None)

  def correct(self, answer: str, reference: str) -> bool:
    pred, ref = self.final_value(answer), self.final_value(reference)
    if pred is None or ref is None:
      return False
    p, r = text_lib.parse_number(pred), text_lib.parse_number(ref)
    if p is None or r is None:
      return self.reward == "exact_match" and pred == ref
    if self.reward == "numeric":
      return abs(p - r) <= self.tolerance * max(1.0, abs(r))
    return p == r

  def grade(self, completion: str, example: base.Example) -> int:
    answer = text_lib.split_completion(completion).answer
    return base.NUM_GRADES if self.correct(answer, example.answer) else 1
