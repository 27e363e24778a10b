"""Tasks by name: the bundled generated tasks (arithmetic, verify), the bundled code problems
(run in the sandbox) and a user's rows (jsonl: a .jsonl or .parquet file or a Hugging Face
dataset)."""

from __future__ import annotations

import math
import string
from typing import Any

from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks.arithmetic import Arithmetic
from corpo_jax.data.tasks.base import NUM_GRADES, Example, Task, in_eval_split
from corpo_jax.data.tasks.code import Code
from corpo_jax.data.tasks.jsonl import Jsonl
from corpo_jax.data.tasks.verify import Verify

TASKS = {"arithmetic": Arithmetic, "verify": Verify, "jsonl": Jsonl, "code": Code}


def get(name: str, weight: float = 1.0, **kwargs: Any) -> Task:
  """A task instance: get("arithmetic", max_digits=4, seed=1), get("jsonl", path="x.jsonl").

  weight: the task's share of an RL stage's prompts relative to the stage's other tasks
  (Task.weight, corpo_jax/data/pipeline.py PromptSource).
  """
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
      math.isfinite(weight) and weight > 0):
    raise ValueError(f"Task weight={weight!r} must be a number > 0 (the {name} task's share of "
                     f"an RL stage's prompts; leave a task out of the stage's tasks instead).")
  task = TASKS[name](**kwargs)
  task.weight = float(weight)
  return task


def bundled_corpus(num_examples: int = 2000) -> list[str]:
  """Tokenizer training texts: train-split prompts and reference completions of the bundled
  tasks (arithmetic up to 8 digits, verify), in the project text format, plus one line of the
  printable ASCII characters and step-marker words so user text rarely needs byte fallback."""
  sources = (Arithmetic(min_digits=1, max_digits=8), Verify())
  extra = [string.printable.strip() + " First, Next, Then, Finally, Step 1: - "]
  return extra + [text_lib.prompt_text(ex.prompt) + ex.completion()
                  for task in sources for ex in (task.example("train", i) for i in range(num_examples))]


__all__ = ["Arithmetic", "Code", "Example", "Jsonl", "NUM_GRADES", "TASKS", "Task", "Verify",
           "bundled_corpus", "get", "in_eval_split"]
