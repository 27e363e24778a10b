"""Multi-digit addition and subtraction with digit-by-digit reference traces.

Prompt `Compute 472 + 59.`; reference completion (project format, corpo_jax/data/text.py):

    <think>
    1. Ones: 2 + 9 = 11, write 1, carry 1.
    2. Tens: 7 + 5 + 1 = 13, write 3, carry 1.
    3. Hundreds: 4 + 1 = 5, write 5, carry 0.
    4. Answer: 531.
    </think>
    531

Subtraction borrows: `1. Ones: 13 - 8 = 5, write 5, borrow 1.` The first operand has between
min_digits and max_digits digits (the difficulty), the second at most as many; subtraction
problems have a >= b so answers are never negative.

Split: single-digit problems are always train (`Arithmetic.in_eval`); larger problems go to
eval by a hash of the problem text.

Grade (1..5), from the integer in the answer part (text.extract_answer):
  5 exact; otherwise the share of correct digits, both numbers right-aligned and zero-padded to
  the longer length: >= 2/3 -> 4, >= 1/3 -> 3, > 0 -> 2; no integer or no correct digit -> 1.
tau = 5: anything not exactly right is a failure.
"""

from __future__ import annotations

import re

import numpy as np

from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import base

_PLACES = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands",
           "Millions", "Ten-millions")


def _place(i: int) -> str:
  return _PLACES[i] if i < len(_PLACES) else f"Digit {i + 1}"


def _digits(n: int, width: int) -> list[int]:
  """Digits of n from the ones place up, zero-padded to width."""
  return [int(c) for c in str(n).zfill(width)[::-1]]


def addition_steps(a: int, b: int) -> list[str]:
  width = len(str(max(a, b)))
  steps, carry = [], 0
  for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
    terms = [x, y] + ([carry] if carry else [])
    total = sum(terms)
    carry = total // 10
    expr = " + ".join(map(str, terms))
    steps.append(f"{_place(i)}: {expr} = {total}, write {total % 10}, carry {carry}.")
  if carry:
    steps.append(f"{_place(width)}: write the carry {carry}.")
  return steps


def subtraction_steps(a: int, b: int) -> list[str]:
  assert a >= b, (a, b)
  width = len(str(a))
  steps, borrow = [], 0
  for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
    new_borrow = int(x - y - borrow < 0)
    left = x + 10 * new_borrow
    expr = f"{left} - {y}" + (f" - {borrow}" if borrow else "")
    diff = left - y - borrow
    steps.append(f"{_place(i)}: {expr} = {diff}, write {diff}, borrow {new_borrow}.")
    borrow = new_borrow
  return steps


def reference_trace(a: int, op: str, b: int) -> tuple[str, int]:
  result = a + b if op == "+" else a - b
  steps = addition_steps(a, b) if op == "+" else subtraction_steps(a, b)
  steps.append(f"Answer: {result}.")
  return "\n".join(f"{k}. {s}" for k, s in enumerate(steps, 1)), result


def parse_int(text: str | None) -> int | None:
  if text is None or not re.fullmatch(r"-?\d+", text):
    return None
  return int(text)


def digit_grade(predicted: int | None, truth: int) -> int:
  if predicted is None:
    return 1
  if predicted == truth:
    return base.NUM_GRADES
  p, t = str(abs(predicted)), str(abs(truth))
  width = max(len(p), len(t))
  share = sum(x == y for x, y in zip(p.zfill(width), t.zfill(width))) / width
  return 4 if share >= 2 / 3 else 3 if share >= 1 / 3 else 2 if share > 0 else 1


class Arithmetic(base.GeneratedTask):
  name = "arithmetic"
  tau = 5

  def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+-", **kwargs):
    super().__init__(**kwargs)
    if not 1 <= min_digits <= max_digits:
      raise ValueError(f"arithmetic digits must satisfy 1 <= min_digits={min_digits} <= "
                       f"max_digits={max_digits}.")
    if not ops or set(ops) - set("+-"):
      raise ValueError(f"arithmetic ops={ops!r} must be a non-empty combination of '+' and '-'.")
    if max_digits == 1:
      raise ValueError("arithmetic max_digits=1 leaves no held-out problems: single-digit facts "
                       "are always in the train split (see Arithmetic.in_eval); use max_digits >= 2.")
    self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops

  def in_eval(self, ex: base.Example) -> bool:
    """Single-digit problems (a, b < 10) are the facts every multi-digit trace is built from:
    they always stay in training, so eval measures carrying digit-level skill to unseen
    multi-digit problems, not guessing an addition fact never shown."""
    if ex.meta["a"] < 10 and ex.meta["b"] < 10:
      return False
    return super().in_eval(ex)

  def generate(self, rng: np.random.Generator) -> base.Example:
    digits = int(rng.integers(self.min_digits, self.max_digits + 1))
    a = _random_number(rng, digits)
    b = _random_number(rng, int(rng.integers(1, digits + 1)))
    op = self.ops[int(rng.integers(len(self.ops)))]
    if op == "-" and a < b:
      a, b = b, a
    trace, result = reference_trace(a, op, b)
    return base.Example(prompt=f"Compute {a} {op} {b}.", answer=str(result), trace=trace,
                        key=f"{a}{op}{b}", group=f"{digits}_digits",
                        meta={"a": a, "b": b, "op": op, "result": result})

  def final_value(self, text: str) -> int | None:
    return parse_int(text_lib.extract_answer(text))

  def grade(self, completion: str, example: base.Example) -> int:
    answer = text_lib.split_completion(completion).answer
    return digit_grade(self.final_value(answer), int(example.answer))


def _random_number(rng: np.random.Generator, digits: int) -> int:
  low = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(low, 10 ** digits))
