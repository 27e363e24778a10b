"""launch/report.py on hand-written eval.jsonl / metrics.jsonl: the numbers in the tables and plots."""

import csv
import json
import math

import pytest
from matplotlib import image

from launch import report, sweep


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval(stage, step, accuracy):
  return {"step": step, "stage": stage, "task": "t", "accuracy": accuracy,
          "pass_at_k": {"1": accuracy, "4": accuracy + 0.1}, "transparency": 1.0,
          "structure": 0.5, "coherence": 0.25, "alignment": 1.0,
          "groups": {"g1": {"accuracy": accuracy / 2, "pass_at_k": {"1": 0.0, "4": 0.5},
                            "count": 2}}}


def _runs(tmp_path):
  """Settings A (final accuracy 0.2, 0.4) and B (0.5, 0.5), two seeds each; C never finished."""
  runs, final = [], {("A", 0): 0.2, ("A", 1): 0.4, ("B", 0): 0.5, ("B", 1): 0.5, ("C", 0): None}
  for (setting, seed), accuracy in final.items():
    name = f"est={setting},seed={seed}"
    run = sweep.Run(name, (("est", setting), ("seed", str(seed))), (), str(tmp_path / name),
                    ("sft", "rl"), (2, 3), ())
    evals = [_eval("sft", 2, 0.1)] + ([_eval("rl", 3, accuracy)] if accuracy is not None else [])
    _write(tmp_path / name / "eval.jsonl", evals)
    _write(tmp_path / name / "metrics.jsonl",
           [{"step": 1, "stage": "sft", "loss": 1.0}]
           + [{"step": k, "stage": "rl", "reward/mean": k + seed, "adv/pos_neg_ratio": 1.0,
               "adv/frac_failed_positive": 0.5 * seed, "kl": "nan"} for k in (1, 2, 3)])
    runs.append(run)
  return runs


def _csv(path):
  with open(path) as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_tables(tmp_path):
  runs = _runs(tmp_path)
  written = report.write(runs, str(tmp_path), title="demo")
  assert written == ["runs.csv", "settings.csv", "training.csv", "reward.png",
                     "frac_failed_positive.png", "pos_neg_ratio.png", "accuracy.png", "results.md"]

  header, rows = _csv(tmp_path / "runs.csv")
  assert header == ["run", "setting", "seed", "est", "task", "group", "accuracy", "pass@1",
                    "pass@4", "start_accuracy", "gain", "transparency", "structure", "coherence",
                    "alignment", "count"]
  # start: the sft eval (accuracy 0.1, group g1 0.05); gain: final minus start, per seed.
  got = [(float(r["start_accuracy"]), float(r["gain"])) for r in rows[:4]]
  assert sum(got, ()) == pytest.approx((0.1, 0.1, 0.05, 0.05, 0.1, 0.3, 0.05, 0.15))
  assert [(r["run"], r["group"], r["accuracy"], r["count"]) for r in rows[:2]] == [
      ("est=A,seed=0", "all", "0.2", ""), ("est=A,seed=0", "g1", "0.1", "2")]
  assert len(rows) == 8  # C has no final evaluation

  _, settings = _csv(tmp_path / "settings.csv")
  a, a_g1, b = settings[0], settings[1], settings[2]
  assert (a["setting"], a["group"], a["seeds"]) == ("est=A", "all", "2")
  assert float(a["accuracy_mean"]) == pytest.approx(0.3)
  assert float(a["accuracy_std"]) == pytest.approx(math.sqrt(0.02))  # sample std of 0.2, 0.4
  assert float(a["pass@4_mean"]) == pytest.approx(0.4)
  assert float(a_g1["accuracy_mean"]) == pytest.approx(0.15) and a_g1["transparency_mean"] == ""
  assert (b["setting"], float(b["accuracy_mean"]), float(b["accuracy_std"])) == ("est=B", 0.5, 0.0)

  _, training = _csv(tmp_path / "training.csv")
  assert [(r["run"], r["stage"], float(r["reward"]), float(r["frac_failed_positive"]))
          for r in training][:2] == [("est=A,seed=0", "rl", 2.0, 0.0), ("est=A,seed=1", "rl", 3.0, 0.5)]

  md = (tmp_path / "results.md").read_text()
  assert "5 runs, 4 with a final evaluation (stage `rl`)" in md
  assert "Not finished (left out): est=C,seed=0." in md
  assert ("| est=A | t | 2 | 0.300 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 | 0.100 ± 0.000 | "
          "0.200 ± 0.141 | 1.000 ± 0.000 | 0.500 ± 0.000 | 0.250 ± 0.000 | 1.000 ± 0.000 |") in md
  assert "| est=B | t | 2 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.100 ± 0.000 | 0.400 ± 0.000 |" in md
  assert "start_accuracy: the accuracy after the first stage (`sft`)" in md
  assert "| est=A | t | g1 | 2 | 0.150 ± 0.071 |" in md
  assert "| est=A | rl | 2 | 2.500 ± 0.707 | 0.250 ± 0.354 | 1.000 ± 0.000 |" in md
  assert "| est=C | rl | 1 | 2.000 | 0.000 | 1.000 |" in md  # one seed: no std
  for name in ("reward", "frac_failed_positive", "pos_neg_ratio", "accuracy"):
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.imread(str(png)).ndim == 3


def test_curves_by_setting_and_seed(tmp_path):
  runs = _runs(tmp_path)
  panels = report.curve_panels(runs, "reward/mean")
  assert list(panels) == ["rl: reward/mean"]
  assert panels["rl: reward/mean"]["est=A"] == [{1: 1.0, 2: 2.0, 3: 3.0}, {1: 2.0, 2: 3.0, 3: 4.0}]
  # Accuracy over all stages end to end: sft's eval at its step 2, rl's at 2 + 3.
  accuracy = report.accuracy_panels(runs)
  assert accuracy["t"]["est=A"] == [{2: 0.1, 5: 0.2}, {2: 0.1, 5: 0.4}]
  assert accuracy["t"]["est=C"] == [{2: 0.1}]


def test_mean_std():
  assert report.mean_std([1.0]) == (1.0, None)
  assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
