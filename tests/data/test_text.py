"""The completion format, answer extraction and step labels."""

import numpy as np
import pytest

from corpo_jax.data import pipeline, steps, text, tokenizer


@pytest.mark.parametrize("completion,trace,answer,well_formed", [
    ("<think>\n1. a\n</think>\n42", "1. a", "42", True),
    ("  <think>x</think> 42 ", "x", "42", True),
    ("<think>\n</think>\n42", "", "42", True),
    ("<think>x</think>", "x", "", False),                      # no answer
    ("42", None, "42", False),                                 # no think block
    ("<think>\n1. a\n2. b", None, "", False),                  # truncated inside the block
    ("<think>a</think><think>b</think>7", "ab", "7", False),    # two blocks
    ("x <think>a</think> 7", "a", "7", False),                 # text before <think>
    ("a</think> 7", "a", "7", False),                          # no opening tag
])
def test_split_completion(completion, trace, answer, well_formed):
  assert text.split_completion(completion) == text.Completion(trace, answer, well_formed)


@pytest.mark.parametrize("s,expected", [
    ("The answer is 42.", "42"),
    ("so 1,234 in total", "1234"),
    ("#### 17\n", "17"),
    ("first 3 then #### 1,000", "1000"),
    ("\\boxed{\\frac{1}{2}} and 5", "\\frac{1}{2}"),
    ("\\boxed{12} then 5", "12"),
    ("-7", "-7"),
    ("2.50 dollars", "2.50"),
    ("#### Paris.", "Paris"),
    ("no numbers", None),
    ("", None),
])
def test_extract_answer(s, expected):
  assert text.extract_answer(s) == expected


def test_prompt_and_completion_text():
  assert text.prompt_text("Compute 1 + 2.\n") == "Compute 1 + 2.\n"
  assert text.format_prompt("2+2?\n", "mistral_instruct") == "[INST] 2+2? [/INST]"
  assert text.format_prompt("2+2?", "Q: {prompt} {x}\nA:") == "Q: 2+2? {x}\nA:"
  for bad in ("chatml", "{prompt} {prompt}"):
    with pytest.raises(ValueError, match="exactly one {prompt}"):
      text.format_prompt("q", bad)
  assert text.escape_think_tags("a <think> b </think>") == "a &lt;think> b &lt;/think>"
  assert text.count_think_tags("<think></think><think>") == 3
  assert text.completion_text(" 1. x \n", " 3 ") == "<think>\n1. x\n</think>\n3"


@pytest.mark.parametrize("line,label", [
    ("1. Ones: 2 + 9 = 11", 1), ("12) carry", 1), ("Step 3: add", 2), ("First, add", 3),
    ("Next we carry", 3), ("Then, 5", 3), ("Finally, 7", 3), ("- bullet", 4), ("* star", 4),
    ("carry on", 0), ("1.5 is a number", 0), ("Firstly", 0), ("-5 is negative", 0), ("", 0),
])
def test_step_type(line, label):
  assert steps.step_type(line) == label


def test_parse_steps():
  assert steps.parse_steps("intro\n1. a\nmore\n\n2. b\n") == ["intro", "1. a\nmore", "2. b"]
  assert steps.parse_steps("para one\nstill\n\npara two") == ["para one\nstill", "para two"]
  assert steps.parse_steps("  ") == []


def test_step_labels_for_a_hand_written_trace():
  tok = tokenizer.bundled()
  trace = "First, add.\n1. Ones: 2\ncarry\nStep 2: x\n- b\n\nThen 3"
  row = pipeline.sft_example(tok, "q", trace, "3")
  ids, labels = row["tokens"], row["step_labels"]
  trace_at = int(np.flatnonzero(ids == tok.think_start_id)[0]) + 2  # <think> \n then the trace
  # The first token of each line carries the line's class; everything else is 0.
  line_starts = [trace_at] + [i + 1 for i in range(trace_at, len(ids))
                              if ids[i] == tok.newline_id][:6]
  assert [int(labels[i]) for i in line_starts] == [3, 1, 0, 2, 4, 0, 3]
  assert [tok.id_to_piece(ids[i]) for i in line_starts] == ["First", "1", "carry", "S", "-", "\n", "T"]
  assert np.count_nonzero(labels) == 5
  assert labels.dtype == np.int32 and labels.shape == (len(ids),)
