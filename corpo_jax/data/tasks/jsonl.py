"""A user's problems: rows of a JSON-lines file, a Parquet file or a Hugging Face dataset.

`path` (and `eval_path`) is one of
  x.jsonl (any name not below)   one JSON object per line; errors name file:line.
  x.parquet                      read with pyarrow (`pip install 'corpo_jax[parquet]'`).
  hf:NAME:SPLIT, hf:NAME:CONFIG:SPLIT   datasets.load_dataset(NAME, CONFIG, split=SPLIT), e.g.
                                 hf:openai/gsm8k:main:train (`pip install datasets`; optional).
A row holds its prompt (a string) under `prompt_key` and its answer (a string or number) under
`answer_key`, and optionally a reasoning "trace" (a string, for SFT on the task's rows). With
`answer_regex` the reference answer is the regex's first group (its whole match if it has none)
in the answer field: `#### (.*)` takes 42 from a GSM8K solution "... #### 42"; a row it does not
match is an error. Every row keeps its fields (Example.meta["row"]): a user's reward functions
get them as columns (corpo_jax/rl/rewards.py).

Rewards (`reward=`): "exact_match" compares the extracted answers as text (numbers compared by
value, so `42.0` matches `42`); "numeric" accepts |pred - ref| <= tolerance * max(1, |ref|).
Answers are extracted with text.extract_answer (`#### X`, `\\boxed{X}`, the last number), falling
back to the whole stripped answer for non-numeric references. Grade 5 correct, 1 otherwise; tau = 5.

Eval rows come from `eval_path` if given, else a hash of the prompt puts `eval_fraction` of the
rows in eval (so the split never depends on row order).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any, Callable

from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import base

REWARDS = ("exact_match", "numeric")
PARQUET_EXTRA = "pip install 'corpo_jax[parquet]'"


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


def _check_row(row: dict, prompt_key: str, answer_key: str) -> str | None:
  for key, option, kinds, what in ((prompt_key, "prompt_key", (str,), "a string"),
                                   (answer_key, "answer_key", (str, int, float),
                                    "a string or number")):
    if key not in row:
      return (f"need a key {key!r} ({option}) but the row's keys are {sorted(row)}; set "
              f"{option} to one of them")
    if not isinstance(row[key], kinds) or isinstance(row[key], bool):
      return f"need {what} under {key!r} ({option}), not {type(row[key]).__name__}"
  if not isinstance(row.get("trace", ""), str):
    return '"trace" must be a string'
  return None


def _hf_rows(path: str) -> list[tuple[str, dict]]:
  """(where, row) of `hf:NAME[:CONFIG]:SPLIT` through datasets.load_dataset."""
  parts = path[len("hf:"):].split(":")
  if len(parts) not in (2, 3) or not all(parts):
    raise ValueError(f"path={path!r}: write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, e.g. "
                     f"hf:openai/gsm8k:main:train.")
  name, config, split = parts if len(parts) == 3 else (parts[0], None, parts[1])
  try:
    datasets = importlib.import_module("datasets")
  except ImportError:
    raise ValueError(f"path={path!r} needs the Hugging Face datasets package: pip install "
                     f"datasets (or export the rows to .jsonl / .parquet).") from None
  rows = datasets.load_dataset(name, config, split=split)
  return [(f"{path} row {i}", dict(row)) for i, row in enumerate(rows, 1)]


def _parquet_rows(path: str) -> list[tuple[str, dict]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"Reading {path!r} needs pyarrow: {PARQUET_EXTRA}.") from None
  if not os.path.isfile(path):
    raise ValueError(f"parquet task file {path!r} does not exist.")
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  (pyarrow's errors have no common base)
    raise ValueError(f"{path}: not a readable Parquet file ({e}).") from None
  return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def read_rows(path: str, prompt_key: str = "prompt", answer_key: str = "answer",
              answer_regex: str = "") -> list[base.Example]:
  """The rows of a user's task file or dataset as Examples (meta: "source" names file:line, or
  the row number for Parquet and datasets, and "row" holds the row); a malformed row raises
  ValueError naming it."""
  try:
    pattern = re.compile(answer_regex) if answer_regex else None
  except re.error as e:
    raise ValueError(f"answer_regex={answer_regex!r} is not a regular expression ({e}).") from None
  check = lambda row: _check_row(row, prompt_key, answer_key)
  if path.startswith("hf:") or path.endswith(".parquet"):
    rows = _hf_rows(path) if path.startswith("hf:") else _parquet_rows(path)
    for where, row in rows:
      problem = check(row)
      if problem:
        raise ValueError(f"{where}: {problem}.")
    if not rows:
      raise ValueError(f"{path!r} has no rows.")
  else:
    fmt = json.dumps({prompt_key: "...", answer_key: "..."})
    rows = [(f"{path}:{line}", row)
            for line, row in read_numbered(path, "jsonl task file", fmt, check)]
  return [base.Example(prompt=row[prompt_key], answer=_answer(row[answer_key], pattern, where),
                       trace=row.get("trace", ""), key=row[prompt_key],
                       meta={"source": where, "row": row}) for where, row in rows]


def _answer(value: str | int | float, pattern: re.Pattern | None, where: str) -> str:
  if pattern is None:
    return str(value)
  match = pattern.search(str(value))
  answer = (match.group(1) if pattern.groups else match.group(0)) if match else None
  if not (answer or "").strip():
    raise ValueError(f"{where}: answer_regex {pattern.pattern!r} finds no answer in "
                     f"{str(value)[-80:]!r}.")
  return answer.strip()


class Jsonl(base.Task):
  name = "jsonl"
  tau = 5

  def __init__(self, path: str, reward: str = "exact_match", tolerance: float = 1e-6,
               eval_path: str | None = None, eval_fraction: float = 0.1,
               prompt_key: str = "prompt", answer_key: str = "answer", answer_regex: str = ""):
    if reward not in REWARDS:
      raise ValueError(f"jsonl reward={reward!r}; choose one of {REWARDS}.")
    self.reward, self.tolerance = reward, tolerance
    keys = dict(prompt_key=prompt_key, answer_key=answer_key, answer_regex=answer_regex)
    rows = read_rows(path, **keys)
    if eval_path:
      self._rows = {"train": rows, "eval": read_rows(eval_path, **keys)}
    else:
      self._rows = {"train": [e for e in rows if not base.in_eval_split(e.key, eval_fraction)],
                    "eval": [e for e in rows if base.in_eval_split(e.key, eval_fraction)]}
    self.path = path
    self.prompt_key, self.answer_key, self.answer_regex = prompt_key, answer_key, answer_regex

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
