"""Parsers of model output and user files never raise on any text (hypothesis)."""

import json

import hypothesis
from hypothesis import strategies as st

from corpo_jax.data import distill, steps, tasks
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import code as code_lib
from corpo_jax.data.tasks import verify

# Text rich in the characters the parsers look for, mixed with arbitrary unicode.
TEXT = st.text(alphabet=st.sampled_from(list("<think>/ \n\t0123456789+-=.,AB:#$\\boxed{}`\"'[]"))
               | st.characters(), max_size=200)
SETTINGS = hypothesis.settings(max_examples=300, deadline=None)


@SETTINGS
@hypothesis.given(TEXT)
def test_answer_extraction_never_raises(text):
  parts = text_lib.split_completion(text)
  assert parts.trace is None or isinstance(parts.trace, str)
  answer = text_lib.extract_answer(text)
  assert answer is None or isinstance(answer, str)
  number = text_lib.parse_number(answer)
  assert number is None or isinstance(number, float)
  assert isinstance(code_lib.extract_code(text), str)
  assert isinstance(steps.parse_steps(text), list)


@SETTINGS
@hypothesis.given(TEXT, st.sampled_from(["A: {} B: {}", "A:{}, B:{}.", "A: {}\nB: {}"]),
                  st.integers(-5, 10**30), st.integers(0, 12))
def test_verifier_rating_parsing_never_raises(text, fmt, a, b):
  task = tasks.get("verify")
  ex = task.example("train", 0)
  for answer in (text, fmt.format(a, b), text + fmt.format(a, b)):
    ratings = verify.parse_ratings(answer)
    assert ratings is None or all(0 <= r <= 10 for r in ratings)
    assert task.final_value(answer) is None or len(task.final_value(answer)) == 2
    assert 1 <= task.grade(text_lib.completion_text("t", answer), ex) <= 5
    assert 1 <= task.grade(answer, ex) <= 5


@SETTINGS
@hypothesis.given(TEXT, TEXT)
def test_distill_parser_never_raises(response, line):
  out = distill.parse_response({"prompt": "p", "response": response})
  assert out is None or out["num_steps"] == len(out["parsed_steps"])
  for candidate in (line, json.dumps({"prompt": line, "response": response}), json.dumps(line)):
    row, why = distill._row(candidate.encode("utf-8", "surrogatepass"))
    assert (row is None) == bool(why)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(),
                           max_size=8))
def test_distill_cli_reports_instead_of_raising(tmp_path_factory, lines):
  directory = tmp_path_factory.mktemp("distill")
  src, dst = directory / "in.jsonl", directory / "out.jsonl"
  src.write_bytes(b"\n".join(lines))
  report = distill.distill(str(src), str(dst))
  assert report.written + len(report.no_trace) + len(report.malformed) == report.lines
