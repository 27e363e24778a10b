"""python -m corpo_jax.plot on small metrics.jsonl / eval.jsonl files written here."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from corpo_jax import plot

BLUE = (31, 119, 180)  # matplotlib's C0: the first workdir's lines


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rl_row(step, **extra):
  return {"step": step, "stage": "rl", "time": 0.0, "reward/mean": 0.25 * step, "kl": 0.01 * step,
          "entropy": 1.0 - 0.1 * step, "completion/length_mean": 10.0 + step,
          "adv/frac_failed_positive": 0.5, "adv/frac_correctness_mode": 0.25,
          "expert_load": [0.5, 0.5], **extra}


@pytest.fixture
def two_runs(tmp_path):
  """Run a: sft (2 steps) then rl (4 steps, one reward "nan"), evaluated after each stage.
  Run b: rl only (2 steps), reward alone, no eval.jsonl."""
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  _write(a / "metrics.jsonl",
         [{"step": k, "stage": "sft", "time": 0.0, "loss": 1.0} for k in (1, 2)]
         + [_rl_row(1), _rl_row(2, **{"reward/mean": "nan"}), _rl_row(3), _rl_row(4)])
  _write(a / "eval.jsonl", [
      {"step": 2, "stage": "sft", "task": "arithmetic", "accuracy": 0.25, "pass_at_k": {"1": 0.25}},
      {"step": 4, "stage": "rl", "task": "arithmetic", "accuracy": 0.5, "pass_at_k": {"1": 0.5}},
      {"step": 4, "stage": "rl", "task": "verify", "accuracy": 0.75, "pass_at_k": {"1": 0.75}}])
  _write(b / "metrics.jsonl", [{"step": k, "stage": "rl", "time": 0.0, "reward/mean": 0.5}
                               for k in (1, 2)])
  return a, b


def _data_lines(ax):
  """(label, x, y) of the runs' lines (not the stage marks)."""
  return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
          for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_one_run_writes_a_png_per_quantity(two_runs, tmp_path):
  a, _ = two_runs
  plot.main(["--workdir", str(a)])
  names = ["reward.png", "kl.png", "entropy.png", "completion_length.png",
           "adv_frac_correctness_mode.png", "adv_frac_failed_positive.png", "accuracy.png"]
  assert sorted(p.name for p in (a / "plots").iterdir()) == sorted(names)
  for name in names:
    data = (a / "plots" / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    image = np.asarray(Image.open(a / "plots" / name).convert("RGB"))
    assert image.shape == ((380, 1000, 3) if name == "accuracy.png" else (380, 640, 3)), name
    # The run's line is drawn: the legend's sample alone has ~60 pixels of its colour.
    assert np.all(image == BLUE, axis=-1).sum() > 150, name
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name  # text, axes, line


def test_steps_run_across_stages_and_stages_are_marked(two_runs):
  a, b = two_runs
  runs = [plot.load(str(a), "a"), plot.load(str(b), "b")]
  figs = plot.figures(runs)
  assert sorted(figs) == ["accuracy.png", "adv_frac_correctness_mode.png",
                          "adv_frac_failed_positive.png", "completion_length.png",
                          "entropy.png", "kl.png", "reward.png"]
  ax, = figs["reward.png"].axes
  (la, xa, ya), (lb, xb, yb) = _data_lines(ax)
  assert (la, xa, lb, xb, yb) == ("a", [3, 4, 5, 6], "b", [1, 2], [0.5, 0.5])  # a's rl after sft
  assert ya[0] == 0.25 and math.isnan(ya[1]) and ya[2:] == [0.75, 1.0]
  assert [t.get_text() for t in ax.texts] == [" sft, rl", " rl"]  # a's sft and b's rl at 0
  assert [line.get_xdata()[0] for line in ax.get_lines()[2:]] == [0, 2]
  kl = figs["kl.png"].axes[0]
  assert [(label, x) for label, x, _ in _data_lines(kl)] == [("a", [3, 4, 5, 6])]  # b has no kl
  arithmetic, verify = figs["accuracy.png"].axes
  assert _data_lines(arithmetic) == [("a", [2, 6], [0.25, 0.5])]
  assert _data_lines(verify) == [("a", [6], [0.75])]
  assert arithmetic.get_title() == "arithmetic: accuracy"


def test_several_workdirs_are_overlaid_into_out(two_runs, tmp_path, capsys):
  a, b = two_runs
  plot.main(["--workdir", str(a), "--workdir", str(b), "--out", str(tmp_path / "cmp")])
  printed = capsys.readouterr().out.split()
  assert printed[0] == str(tmp_path / "cmp" / "reward.png") and len(printed) == 7
  image = np.asarray(Image.open(tmp_path / "cmp" / "reward.png").convert("RGB"))
  assert np.all(image == (255, 127, 14), axis=-1).sum() > 150  # C1: the second workdir's line
  with pytest.raises(ValueError, match=r"--workdir='.*nowhere' has no metrics.jsonl"):
    plot.main(["--workdir", str(tmp_path / "nowhere")])
