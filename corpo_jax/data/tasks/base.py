"""What every task provides: examples by (split, index), a grade and the correctness threshold.

Grades are ordinal on 1..NUM_GRADES (5 = best). A completion is a failure when grade < tau
(docs/algorithms.md); `exact` is the binary correctness. Generated tasks are unlimited: example i of a
split is a pure function of (seed, split, i). Train and eval never share a problem: a problem
belongs to the eval split iff a hash of its canonical text falls below `eval_fraction`, and
generators redraw until the problem lands in the requested split.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any

import numpy as np

from corpo_jax.data import text as text_lib

NUM_GRADES = 5
SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem. `key` is the canonical problem text that decides its split; `group` is the
  eval breakdown it belongs to (e.g. the verifier's ground-truth configuration)."""

  prompt: str
  answer: str
  trace: str
  key: str
  group: str = ""
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def completion(self) -> str:
    """The reference completion text (trace and answer in the project format)."""
    return text_lib.completion_text(self.trace, self.answer)


def in_eval_split(key: str, eval_fraction: float) -> bool:
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")


class Task(abc.ABC):
  """A task. Subclasses set `name` and `tau` and implement the abstract methods."""

  name: str
  tau: int  # failure threshold on the 1..NUM_GRADES grade scale
  weight: float = 1.0  # share of an RL stage's prompts relative to its other tasks (tasks.get)

  @abc.abstractmethod
  def example(self, split: str, index: int) -> Example:
    """Example `index` (any int >= 0) of `split`."""

  @abc.abstractmethod
  def size(self, split: str) -> int:
    """How many distinct indices one epoch of `split` has."""

  @abc.abstractmethod
  def grade(self, completion: str, example: Example) -> int:
    """Ordinal grade 1..NUM_GRADES of a decoded completion. Never raises on odd text."""

  @abc.abstractmethod
  def final_value(self, text: str) -> Any:
    """The comparable result stated in `text` (an answer or a trace's last line); None if none."""

  def exact(self, completion: str, example: Example) -> bool:
    return self.grade(completion, example) == NUM_GRADES

  def __repr__(self) -> str:  # stable: grain checks it when restoring an iterator
    fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())
                       if not k.startswith("_") and k != "weight")  # the mix's sampler has it
    return f"{type(self).__name__}({fields})"


class GeneratedTask(Task):
  """A task whose problems are drawn from a seeded generator (see module docstring)."""

  def __init__(self, seed: int = 0, eval_fraction: float = 0.1, train_size: int = 1 << 20,
               eval_size: int = 1000):
    if not 0 < eval_fraction < 1:
      raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
    self.seed, self.eval_fraction = seed, eval_fraction
    self._sizes = {"train": train_size, "eval": eval_size}

  def size(self, split: str) -> int:
    check_split(split)
    return self._sizes[split]

  def example(self, split: str, index: int) -> Example:
    check_split(split)
    for attempt in range(10_000):
      rng = np.random.default_rng([self.seed, SPLITS.index(split), index, attempt])
      ex = self.generate(rng)
      if self.in_eval(ex) == (split == "eval"):
        return ex
    raise AssertionError(f"{self.name}: no {split} problem in 10000 draws")

  def in_eval(self, ex: Example) -> bool:
    """Whether a generated problem belongs to the eval split (default: hash of its key)."""
    return in_eval_split(ex.key, self.eval_fraction)

  @abc.abstractmethod
  def generate(self, rng: np.random.Generator) -> Example:
    """One problem from `rng` (either split; `example` keeps those of the right split)."""
