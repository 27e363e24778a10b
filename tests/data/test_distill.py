"""The distill CLI on a fixture: good rows, rows without traces, broken lines."""

import os

import pytest

from corpo_jax.data import distill, pipeline, tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPORT = """\
distill: {input} -> {output}
  lines read:      7
  traces written:  3
  without a trace: 2 (lines 2, 6)
  malformed lines: 2
    line 5: invalid JSON (Expecting ',' delimiter at column 53)
    line 8: need an object with string "prompt" and "response"
"""


def test_distill_fixture_outputs_and_report(tmp_path, capsys):
  src, dst = os.path.join(FIXTURES, "responses.jsonl"), str(tmp_path / "traces.jsonl")
  assert distill.main(["--input", src, "--output", dst]) == 0
  assert capsys.readouterr().out == REPORT.format(input=src, output=dst)
  # Golden output (tests/data/fixtures/traces.jsonl): regenerate with the command in the module
  # docstring only when the output format changes on purpose.
  with open(dst) as got, open(os.path.join(FIXTURES, "traces.jsonl")) as want:
    assert got.read() == want.read()
  # The SFT pipeline reads the output directly.
  rows = pipeline.read_traces(dst)
  assert [r["final_output"] for r in rows] == ["5", "Rayleigh scattering.", "4 ✓"]
  tok = tokenizer.bundled()
  assert tok.decode(pipeline.sft_example(tok, **{
      "prompt": rows[0]["prompt"], "trace": rows[0]["thinking_trace"],
      "answer": rows[0]["final_output"]})["tokens"]) == (
          "What is 2 + 3?\n<think>\n1. 2 + 3 = 5.\n2. Check: 5 - 3 = 2.\n</think>\n5")


def test_parse_response_keeps_other_fields():
  out = distill.parse_response({"prompt": "p", "response": "<think>\n- a\n- b\n</think>\n x ",
                                "id": 3, "tags": ["t"]})
  assert out == {"prompt": "p", "id": 3, "tags": ["t"], "thinking_trace": "- a\n- b",
                 "parsed_steps": ["- a", "- b"], "final_output": "x", "num_steps": 2}
  assert distill.parse_response({"prompt": "p", "response": "<think>unfinished"}) is None


def test_missing_input_is_a_usage_error(tmp_path):
  with pytest.raises(SystemExit):
    distill.main(["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")])
