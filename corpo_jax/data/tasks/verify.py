"""A pairwise explanatory verifier in miniature (the CoRPO paper's verifier task).

The prompt shows a small arithmetic problem and two candidate answers, each right or wrong:

    Check the answers to 23 + 48.
    A: 71
    B: 61
    Rate each answer from 0 to 10.

The model reasons in <think> and then answers exactly `A: <0..10> B: <0..10>`. Reference:

    <think>
    1. 23 + 48 = 71.
    2. A says 71, which is right.
    3. B says 61, which is wrong.
    4. So A: 10 B: 0.
    </think>
    A: 10 B: 0

Centring and confidence: a rating r is centred as c = r - 5. c > 0 judges the candidate right,
c < 0 wrong, c = 0 is undecided and counts as a wrong judgement. The confidence margin is
min(|c_A|, |c_B|); a margin >= 3 (ratings <= 2 or >= 8) is confident.

Grade: 1 malformed (completion not well-formed or ratings not in the exact format / not in
0..10), 2 both judgements wrong, 3 exactly one right, 4 both right with margin < 3,
5 both right and confident. tau = 4. Eval groups (Example.group) are the ground-truth
configurations first_right, second_right, both_wrong, both_right.
"""

from __future__ import annotations

import re

import numpy as np

from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import base

GROUPS = ("both_right", "first_right", "second_right", "both_wrong")
CONFIDENT_MARGIN = 3
_RATINGS = r"A\s*:\s*(\d+)\s*,?\s*B\s*:\s*(\d+)"
_WRONG_OFFSETS = (-10, -2, -1, 1, 2, 10)


def parse_ratings(answer: str) -> tuple[int, int] | None:
  """The two ratings of an answer in the exact format `A: x B: y` (0..10 each), else None."""
  m = re.fullmatch(_RATINGS + r"\s*\.?", answer.strip())
  if not m:
    return None
  ratings = int(m.group(1)), int(m.group(2))
  return ratings if max(ratings) <= 10 else None


def ratings_grade(ratings: tuple[int, int] | None, truth: tuple[bool, bool]) -> int:
  if ratings is None:
    return 1
  centred = [r - 5 for r in ratings]
  correct = sum(c != 0 and (c > 0) == right for c, right in zip(centred, truth))
  if correct < 2:
    return 2 + correct
  return 5 if min(abs(c) for c in centred) >= CONFIDENT_MARGIN else 4


class Verify(base.GeneratedTask):
  name = "verify"
  tau = 4

  def __init__(self, max_operand: int = 99, **kwargs):
    super().__init__(**kwargs)
    if max_operand < 2:
      raise ValueError(f"verify max_operand={max_operand} must be >= 2.")
    self.max_operand = max_operand

  def generate(self, rng: np.random.Generator) -> base.Example:
    a, b = (int(x) for x in rng.integers(1, self.max_operand + 1, size=2))
    op = "+-"[int(rng.integers(2))]
    if op == "-" and a < b:
      a, b = b, a
    result = a + b if op == "+" else a - b
    group = GROUPS[int(rng.integers(len(GROUPS)))]
    truth = (group in ("both_right", "first_right"), group in ("both_right", "second_right"))
    shown = [result if right else result + int(rng.choice(_WRONG_OFFSETS)) for right in truth]
    ratings = [10 if right else 0 for right in truth]
    verdict = ["right" if right else "wrong" for right in truth]
    answer = f"A: {ratings[0]} B: {ratings[1]}"
    trace = "\n".join([f"1. {a} {op} {b} = {result}.",
                       f"2. A says {shown[0]}, which is {verdict[0]}.",
                       f"3. B says {shown[1]}, which is {verdict[1]}.",
                       f"4. So {answer}."])
    prompt = (f"Check the answers to {a} {op} {b}.\nA: {shown[0]}\nB: {shown[1]}\n"
              "Rate each answer from 0 to 10.")
    return base.Example(prompt=prompt, answer=answer, trace=trace,
                        key=f"{a}{op}{b}|{shown[0]}|{shown[1]}", group=group,
                        meta={"truth": truth})

  def final_value(self, text: str) -> tuple[int, int] | None:
    m = re.search(_RATINGS, text)
    return (int(m.group(1)), int(m.group(2))) if m else None

  def grade(self, completion: str, example: base.Example) -> int:
    parts = text_lib.split_completion(completion)
    if not parts.well_formed:
      return 1
    return ratings_grade(parse_ratings(parts.answer), tuple(example.meta["truth"]))
