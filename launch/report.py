"""Sweep results: each run's final evaluation and training curves as tables and plots.

Reads every run's eval.jsonl and metrics.jsonl (written by corpo_jax/train/loop.py) and writes
into the sweep root:
  runs.csv       one row per (run, task, group): the final evaluation (the last stage's eval at
                 its last step); group "all" is the whole task, the others its eval groups (e.g.
                 the verifier's ground-truth configurations). Runs of several stages also carry
                 start_accuracy (the first stage's final eval, e.g. after the warm start) and
                 gain = accuracy - start_accuracy, so seeds are compared paired
  settings.csv   one row per (setting, task, group): mean and sample std over the setting's seeds
  training.csv   one row per (run, RL stage): the mean over the stage's steps of each CURVES key
                 (columns named by the CURVES names)
  results.md     the tables (mean ± std over seeds) and the plots
  <curve>.png    a CURVES key over the steps of each RL stage, one line per setting (the mean over
                 its seeds) in a band of ± one std
  accuracy.png   eval accuracy over the steps of all stages end to end, one panel per task
`runs` are launch/sweep.py Runs: name, setting, seed, items, path, stages, stage_steps.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

import numpy as np

from corpo_jax.plot import pyplot
from corpo_jax.train.metrics import read_jsonl

CURVES = {"reward": "reward/mean", "frac_failed_positive": "adv/frac_failed_positive",
          "pos_neg_ratio": "adv/pos_neg_ratio"}
THINKING = ("transparency", "structure", "coherence", "alignment")


def _rows(run, filename: str) -> list[dict]:
  path = os.path.join(run.path, filename)
  return read_jsonl(path) if os.path.exists(path) else []


def _number(value: Any) -> float:
  return float(value)  # metrics.jsonl writes non-finite floats as "nan" / "inf"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- tables


def stage_eval(run, index: int) -> list[dict]:
  """The eval rows of stage `index` (-1: the last) at its last step, one per task."""
  stage, step = run.stages[index], run.stage_steps[index]
  return [r for r in _rows(run, "eval.jsonl") if r["stage"] == stage and r["step"] == step]


def _start(row: dict, start: dict | None) -> dict[str, float]:
  """start_accuracy and gain of a final eval (row) against the first stage's (start)."""
  if start is None:
    return {}
  return {"start_accuracy": start["accuracy"], "gain": row["accuracy"] - start["accuracy"]}


def _scores(row: dict) -> dict[str, float]:
  out = {"accuracy": row["accuracy"]}
  out.update({f"pass@{k}": v for k, v in sorted(row["pass_at_k"].items(), key=lambda kv: int(kv[0]))})
  return out


def eval_records(run) -> list[dict]:
  """The run's final evaluation: one record per task (group "all") and per task group."""
  head = {"run": run.name, "setting": run.setting, "seed": run.seed, **dict(run.items)}
  starts = {r["task"]: r for r in stage_eval(run, 0)} if len(run.stages) > 1 else {}
  records = []
  for row in stage_eval(run, -1):
    start = starts.get(row["task"])
    records.append({**head, "task": row["task"], "group": "all", **_scores(row),
                    **_start(row, start), **{k: row[k] for k in THINKING}})
    for group, sub in row.get("groups", {}).items():
      start_sub = start.get("groups", {}).get(group) if start else None
      records.append({**head, "task": row["task"], "group": group, **_scores(sub),
                      **_start(sub, start_sub), "count": sub["count"]})
  return records


def training_records(run) -> list[dict]:
  """Per RL stage of the run: the mean over its steps of each CURVES key."""
  rows = _rows(run, "metrics.jsonl")
  records = []
  for stage in run.stages:
    stage_rows = [r for r in rows if r["stage"] == stage and CURVES["reward"] in r]
    if stage_rows:
      records.append({"run": run.name, "setting": run.setting, "seed": run.seed, "stage": stage,
                      "steps": len(stage_rows),
                      **{name: float(np.mean([_number(r[key]) for r in stage_rows]))
                         for name, key in CURVES.items()}})
  return records


def by_setting(records: list[dict], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
  """Records grouped by `keys` (in order of appearance): seeds, and mean/std of each metric."""
  groups: dict[tuple, list[dict]] = {}
  for record in records:
    groups.setdefault(tuple(record[k] for k in keys), []).append(record)
  out = []
  for values, members in groups.items():
    row = {**dict(zip(keys, values)), "seeds": len(members)}
    for metric in metrics:
      present = [m[metric] for m in members if m.get(metric) is not None]
      if present:
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(present)
    out.append(row)
  return out


def _columns(records: list[dict], first: Sequence[str]) -> list[str]:
  columns = list(dict.fromkeys(first))
  for record in records:
    columns += [k for k in record if k not in columns]
  return columns


def write_csv(path: str, records: list[dict], first: Sequence[str]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, _columns(records, first), restval="")
    writer.writeheader()
    writer.writerows(records)


def _cell(row: dict, metric: str) -> str:
  mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
  if mean is None:
    return ""
  return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def markdown_table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _metric_names(records: list[dict]) -> list[str]:
  names = ["accuracy"]
  names += sorted({k for r in records for k in r if k.startswith("pass@")},
                  key=lambda k: int(k[5:]))
  return names + [k for k in ("start_accuracy", "gain") if any(k in r for r in records)]


# ----------------------------------------------------------------------------- plots


def _band(ax, series: list[dict[int, float]], label: str) -> None:
  """The mean over seeds of {step: value} series, in a band of ± one sample std."""
  steps = sorted({s for one in series for s in one})
  values_SN = np.array([[one.get(s, math.nan) for s in steps] for one in series], np.float64)
  count_N = np.sum(~np.isnan(values_SN), axis=0)
  mean_N = np.nanmean(values_SN, axis=0)
  line, = ax.plot(steps, mean_N, label=label, marker="o" if len(steps) < 12 else None, ms=3)
  if len(series) > 1:
    centred = np.where(np.isnan(values_SN), 0.0, values_SN - mean_N)
    std_N = np.sqrt(np.sum(centred**2, axis=0) / np.maximum(count_N - 1, 1))
    ax.fill_between(steps, mean_N - std_N, mean_N + std_N, color=line.get_color(), alpha=0.2,
                    linewidth=0)


def plot_panels(path: str, panels: dict[str, dict[str, list[dict[int, float]]]], ylabel: str,
                xlabel: str) -> None:
  """One subplot per panel title; in each, one band per setting."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (title, settings) in zip(axes[0], panels.items()):
    for setting, series in settings.items():
      _band(ax, series, setting)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curve_panels(runs, key: str) -> dict[str, dict[str, list[dict[int, float]]]]:
  """{RL stage: {setting: [{step: value} per seed]}} of a metrics.jsonl key."""
  panels: dict[str, dict[str, list]] = {}
  for run in runs:
    rows = [r for r in _rows(run, "metrics.jsonl") if key in r]
    for stage in run.stages:
      series = {r["step"]: _number(r[key]) for r in rows if r["stage"] == stage}
      if series:
        panels.setdefault(f"{stage}: {key}", {}).setdefault(run.setting, []).append(series)
  return panels


def accuracy_panels(runs) -> dict[str, dict[str, list[dict[int, float]]]]:
  """{task: {setting: [{step from the start of the first stage: accuracy} per seed]}}."""
  panels: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
  for run in runs:
    offsets = dict(zip(run.stages, np.cumsum((0,) + run.stage_steps[:-1]).tolist()))
    for row in _rows(run, "eval.jsonl"):
      if row["stage"] in offsets:
        series = panels.setdefault(row["task"], {}).setdefault(run.setting, {})
        series.setdefault(run.name, {})[offsets[row["stage"]] + row["step"]] = row["accuracy"]
  return {task: {s: list(by_run.values()) for s, by_run in settings.items()}
          for task, settings in panels.items()}


# ----------------------------------------------------------------------------- the report


def write(runs, root: str, *, title: str) -> list[str]:
  """Writes the tables and plots of `runs` into `root`; returns the files written."""
  os.makedirs(root, exist_ok=True)
  records = [r for run in runs for r in eval_records(run)]
  training = [r for run in runs for r in training_records(run)]
  metrics = _metric_names(records)
  settings = by_setting(records, ("setting", "task", "group"), metrics + list(THINKING))
  train_settings = by_setting(training, ("setting", "stage"), list(CURVES))
  item_keys = [k for run in runs for k, _ in run.items]
  write_csv(os.path.join(root, "runs.csv"), records,
            ["run", "setting", "seed", *item_keys, "task", "group", *metrics])
  write_csv(os.path.join(root, "settings.csv"), settings, ["setting", "task", "group", "seeds"])
  write_csv(os.path.join(root, "training.csv"), training, ["run", "setting", "seed", "stage"])
  written = ["runs.csv", "settings.csv", "training.csv"]

  plots = {f"{name}.png": curve_panels(runs, key) for name, key in CURVES.items()}
  plots["accuracy.png"] = accuracy_panels(runs)
  for filename, panels in plots.items():
    if panels:
      xlabel = "step (all stages)" if filename == "accuracy.png" else "step"
      ylabel = "accuracy" if filename == "accuracy.png" else filename[:-4]
      plot_panels(os.path.join(root, filename), panels, ylabel, xlabel)
      written.append(filename)

  evaluated = {r["run"] for r in records}
  lines = [f"# Sweep results: {title}", "",
           f"{len(runs)} runs, {len(evaluated)} with a final evaluation (stage "
           f"`{runs[0].stages[-1]}`); mean ± sample std over the seeds of each setting.", ""]
  missing = [run.name for run in runs if run.name not in evaluated]
  if missing:
    lines += [f"Not finished (left out): {', '.join(missing)}.", ""]
  if "gain" in metrics:
    lines += [f"start_accuracy: the accuracy after the first stage (`{runs[0].stages[0]}`); gain: "
              "final accuracy minus start_accuracy, per seed, then averaged.", ""]
  overall = [s for s in settings if s["group"] == "all"]
  lines += ["## Final evaluation", ""]
  lines += markdown_table(["setting", "task", "seeds", *metrics, *THINKING],
                          [[s["setting"], s["task"], s["seeds"],
                            *(_cell(s, m) for m in metrics + list(THINKING))] for s in overall])
  grouped = [s for s in settings if s["group"] != "all"]
  if grouped:
    lines += ["", "## Final evaluation per task group", ""]
    lines += markdown_table(["setting", "task", "group", "seeds", *metrics],
                            [[s["setting"], s["task"], s["group"], s["seeds"],
                              *(_cell(s, m) for m in metrics)] for s in grouped])
  if train_settings:
    lines += ["", "## Training (mean over each RL stage's steps)", ""]
    lines += markdown_table(["setting", "stage", "seeds", *CURVES.values()],
                            [[s["setting"], s["stage"], s["seeds"],
                              *(_cell(s, name) for name in CURVES)] for s in train_settings])
  lines += ["", "## Runs", ""]
  lines += markdown_table(["run", "task", *metrics],
                          [[r["run"], r["task"], *(f"{r[m]:.3f}" for m in metrics)]
                           for r in records if r["group"] == "all"])
  pngs = [w for w in written if w.endswith(".png")]
  if pngs:
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in pngs]
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return written + ["results.md"]
