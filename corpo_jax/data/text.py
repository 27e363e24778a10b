"""The one text format of prompts and completions, and answer extraction.

Token layout of one example (special ids from the tokenizer):

    <bos> PROMPT <think> \\n TRACE \\n </think> \\n ANSWER <eos>
    `- format_prompt -'`------------ completion_text ------------'

The prompt is the task's question in the run's prompt format (`format_prompt`: by default the
question followed by one newline); the model writes the completion:
`<think>`, a newline, the reasoning trace (one step per line), a newline, `</think>`, a newline,
the final answer, then `<eos>`. Decoding drops <bos>/<eos>/<pad> and keeps `<think>`/`</think>`
as text, so decoded completions are parsed by `split_completion`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"


PROMPT_FORMATS = {
    "plain": "{prompt}\n",
    "mistral_instruct": "[INST] {prompt} [/INST]",  # Mistral / Mixtral-Instruct (v0.1) turns
}


def format_prompt(question: str, prompt_format: str = "plain") -> str:
  """The prompt text of a question: a PROMPT_FORMATS name or a template holding "{prompt}" once.

  The question's trailing newlines are dropped first. Other braces in a template are literal.
  """
  template = PROMPT_FORMATS.get(prompt_format, prompt_format)
  if template.count("{prompt}") != 1:
    raise ValueError(f"prompt_format={prompt_format!r} is neither one of {sorted(PROMPT_FORMATS)} "
                     f"nor a template with exactly one {{prompt}}, e.g. 'Question: {{prompt}}\\n'.")
  return template.replace("{prompt}", question.rstrip("\n"))


def prompt_text(question: str) -> str:
  """The plain prompt format."""
  return format_prompt(question, "plain")


def count_think_tags(text: str) -> int:
  return text.count(THINK_OPEN) + text.count(THINK_CLOSE)


def escape_think_tags(text: str) -> str:
  """Literal think tags in user text written so that they tokenize as text: "<" -> "&lt;"."""
  return text.replace(THINK_CLOSE, "&lt;/think>").replace(THINK_OPEN, "&lt;think>")


def completion_text(trace: str, answer: str) -> str:
  return f"{THINK_OPEN}\n{trace.strip()}\n{THINK_CLOSE}\n{answer.strip()}"


@dataclasses.dataclass(frozen=True)
class Completion:
  """A decoded completion split into its parts.

  trace: the text inside the think block (None when there is no closed block).
  answer: the text after the last `</think>` (the whole text when there is no think block,
    "" when a block was opened but never closed, e.g. a truncated completion).
  well_formed: exactly one `<think>` at the start, exactly one `</think>` after it, and a
    non-empty answer after it (the `format` reward).
  """

  trace: str | None
  answer: str
  well_formed: bool


def split_completion(text: str) -> Completion:
  opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
  if closes == 0:
    return Completion(None, "" if opens else text.strip(), False)
  head, _, answer = text.rpartition(THINK_CLOSE)
  start = head.find(THINK_OPEN)
  trace = head[start + len(THINK_OPEN):] if start >= 0 else head
  trace = trace.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()
  answer = answer.strip()
  well_formed = (opens == 1 and closes == 1 and text.lstrip().startswith(THINK_OPEN)
                 and bool(answer))
  return Completion(trace, answer, well_formed)


def extract_answer(text: str) -> str | None:
  """The final answer in free text: `#### X`, else the last `\\boxed{X}`, else the last number.

  Returns the answer stripped of surrounding space and a trailing period, numbers without
  thousands separators; None when nothing answer-like is found.
  """
  hashes = re.findall(r"####\s*([^\n]+)", text)
  if hashes:
    return _clean(hashes[-1])
  boxed = _last_boxed(text)
  if boxed is not None:
    return _clean(boxed)
  numbers = re.findall(_NUMBER, text)
  return _clean(numbers[-1]) if numbers else None


def _last_boxed(text: str) -> str | None:
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 1, start + len("\\boxed{")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def _clean(answer: str) -> str:
  answer = answer.strip().rstrip(".").strip().strip("$").strip()
  if re.fullmatch(_NUMBER, answer):
    answer = answer.replace(",", "")
  return answer


def parse_number(text: str | None) -> float | None:
  if text is None:
    return None
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to and including the earliest occurrence of any `stop` string (all of it when
  none occurs)."""
  ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
  return text[:min(ends)] if ends else text


def stop_length(ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                stop: Sequence[str]) -> int | None:
  """The number of leading tokens of `ids` whose decoded text first contains a `stop` string
  (the tokens through the one that completes it), or None when the whole text has none.
  Containment only grows with the prefix, so a bisection needs about log2(len(ids)) decodes."""
  hit = lambda n: any(s in decode(ids[:n]) for s in stop)
  if not stop or not hit(len(ids)):
    return None
  lo, hi = 1, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
  return lo
