"""Step markers of reasoning traces: the thinking head's 5-class step labels (docs/algorithms.md).

A line of a trace starts a step of type 1 numbered (`1.` or `1)`), 2 `Step k:`, 3 a transition
word (First, Next, Then, Finally), 4 a bullet (`- `, `* `, `• `); any other line is 0 (continue).
Per-token labels put the line's type on the first token of the line and 0 everywhere else.
"""

from __future__ import annotations

import re

# Step types of the thinking head's step classifier (docs/algorithms.md), marking the first token of a line.
STEP_CONTINUE, STEP_NUMBERED, STEP_STEP_K, STEP_TRANSITION, STEP_BULLET = range(5)
_STEP_PATTERNS = (
    (STEP_NUMBERED, re.compile(r"\s*\d+[.)]\s")),
    (STEP_STEP_K, re.compile(r"\s*Step\s+\d+\s*:")),
    (STEP_TRANSITION, re.compile(r"\s*(First|Next|Then|Finally)\b")),
    (STEP_BULLET, re.compile(r"\s*[-*•]\s")),
)


def step_type(line: str) -> int:
  """The step class of a trace line (STEP_*): how the line starts."""
  for label, pattern in _STEP_PATTERNS:
    if pattern.match(line):
      return label
  return STEP_CONTINUE


def parse_steps(trace: str) -> list[str]:
  """Splits a trace into steps. With step markers, a step starts at each marked line and takes
  the unmarked lines after it (unmarked text before the first marker is a step of its own);
  without any marker, the steps are the paragraphs separated by blank lines."""
  lines = [line.strip() for line in trace.strip().splitlines()]
  if not any(step_type(line) for line in lines):
    return [p.strip() for p in re.split(r"\n\s*\n", trace.strip()) if p.strip()]
  steps: list[str] = []
  for line in filter(None, lines):
    if step_type(line) or not steps:
      steps.append(line)
    else:
      steps[-1] += "\n" + line
  return steps


def count_marked_steps(trace: str) -> int:
  """Lines of `trace` that start with a step marker (the `structure` reward needs >= 2)."""
  return sum(step_type(line) != STEP_CONTINUE for line in trace.splitlines())
