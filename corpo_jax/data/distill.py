"""Extract thinking traces from DeepSeek-R1-style responses for thinking-head pre-training.

  python -m corpo_jax.data.distill --input responses.jsonl --output traces.jsonl

Input rows: {"prompt": str, "response": str, ...}; the response is `<think> TRACE </think> ANSWER`
(a response with `</think>` but no opening tag, as R1 chat templates produce, also works).
Output rows: every input field except "response", plus thinking_trace, parsed_steps (data/steps.py
parse_steps), final_output (the text after `</think>`) and num_steps. The SFT pipeline reads
this format directly (pipeline.read_traces).

Rows without a trace (no `</think>` or an empty trace) are not written; they are counted and
their line numbers reported. Malformed lines (invalid JSON, or no string prompt/response) are
reported with their line numbers. The report is printed to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from corpo_jax.data import steps as steps_lib
from corpo_jax.data import text as text_lib


@dataclasses.dataclass
class Report:
  input: str
  output: str
  lines: int = 0
  written: int = 0
  no_trace: list[int] = dataclasses.field(default_factory=list)
  malformed: list[tuple[int, str]] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    no_trace = ", ".join(map(str, self.no_trace))
    out = [f"distill: {self.input} -> {self.output}",
           f"  lines read:      {self.lines}",
           f"  traces written:  {self.written}",
           f"  without a trace: {len(self.no_trace)}" + (f" (lines {no_trace})" if no_trace else ""),
           f"  malformed lines: {len(self.malformed)}"]
    out += [f"    line {lineno}: {why}" for lineno, why in self.malformed]
    return "\n".join(out)


def parse_response(row: dict) -> dict | None:
  """The output row for one input row, or None when the response has no trace."""
  parts = text_lib.split_completion(row["response"])
  if not parts.trace:
    return None
  steps = steps_lib.parse_steps(parts.trace)
  out = {k: v for k, v in row.items() if k != "response"}
  out.update(thinking_trace=parts.trace, parsed_steps=steps, final_output=parts.answer,
             num_steps=len(steps))
  return out


def _row(raw: bytes) -> tuple[dict | None, str]:
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"not UTF-8 ({e.reason} at byte {e.start})"
  try:
    row = json.loads(line.strip())
  except json.JSONDecodeError as e:
    return None, f"invalid JSON ({e.msg} at column {e.colno})"
  if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
      row.get("response"), str):
    return None, 'need an object with string "prompt" and "response"'
  return row, ""


def distill(input_path: str, output_path: str) -> Report:
  if not os.path.isfile(input_path):
    raise ValueError(f"--input {input_path!r} does not exist.")
  report = Report(input_path, output_path)
  with open(input_path, "rb") as src, open(output_path, "w", encoding="utf-8") as dst:
    for lineno, raw in enumerate(src, 1):
      if not raw.strip():
        continue
      report.lines += 1
      row, why = _row(raw)
      if row is None:
        report.malformed.append((lineno, why))
        continue
      out = parse_response(row)
      if out is None:
        report.no_trace.append(lineno)
        continue
      dst.write(json.dumps(out, ensure_ascii=False) + "\n")
      report.written += 1
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="jsonl of {prompt, response, ...} rows")
  parser.add_argument("--output", required=True, help="jsonl of extracted traces to write")
  args = parser.parse_args(argv)
  try:
    report = distill(args.input, args.output)
  except ValueError as e:
    parser.error(str(e))
  print(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
