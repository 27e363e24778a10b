"""Plots of a run's curves from its workdir: one PNG per quantity, several workdirs overlaid.

  python -m corpo_jax.plot --workdir workdir/grpo                  # into workdir/grpo/plots/
  python -m corpo_jax.plot --workdir runs/grpo --workdir runs/corpo --out plots/

Reads metrics.jsonl and eval.jsonl as corpo_jax/train/loop.py writes them. The x axis is the run's
steps end to end: a stage's step k is at k plus the steps of the stages before it (a stage's length
is its last step in the files, so a run in progress plots too), with each stage's start marked.
Files written, each only where some workdir has the quantity:
  reward.png, kl.png, entropy.png, completion_length.png  the metrics.jsonl keys of QUANTITIES
  adv_<name>.png  each adv/<name> key of metrics.jsonl (the advantage diagnostics)
  accuracy.png    eval.jsonl's accuracy, one panel per task
One line per workdir, in the same colour in every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Sequence

from corpo_jax.train.metrics import read_jsonl

# (file name, metrics.jsonl key); the adv/* keys are added per run.
QUANTITIES = (("reward", "reward/mean"), ("kl", "kl"), ("entropy", "entropy"),
              ("completion_length", "completion/length_mean"))


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display)."""
  try:
    import matplotlib
  except ImportError:
    raise ValueError("Plots need matplotlib, a dependency of corpo_jax: pip install -e . (or pip "
                     "install matplotlib).") from None
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


@dataclasses.dataclass(frozen=True)
class RunLog:
  """A workdir's rows and where each stage starts on the x axis."""

  label: str
  metrics: list[dict[str, Any]]
  evals: list[dict[str, Any]]
  offsets: dict[str, int]  # stage -> the steps of the stages before it


def _stage_offsets(rows: list[dict[str, Any]]) -> dict[str, int]:
  lengths: dict[str, int] = {}  # in the order the stages first appear
  for row in rows:
    lengths[row["stage"]] = max(lengths.get(row["stage"], 0), row["step"])
  offsets, total = {}, 0
  for stage, length in lengths.items():
    offsets[stage], total = total, total + length
  return offsets


def load(workdir: str, label: str) -> RunLog:
  paths = [os.path.join(workdir, name) for name in ("metrics.jsonl", "eval.jsonl")]
  if not os.path.exists(paths[0]):
    raise ValueError(f"--workdir={workdir!r} has no metrics.jsonl; pass the workdir of a run "
                     f"(its --config.workdir).")
  metrics = read_jsonl(paths[0])
  evals = read_jsonl(paths[1]) if os.path.exists(paths[1]) else []
  return RunLog(label, metrics, evals, _stage_offsets(metrics + evals))


def _number(value: Any) -> float:
  return float(value) if value is not None else math.nan  # "nan", "inf": metrics.jsonl's strings


def _series(run: RunLog, rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  rows = [r for r in rows if key in r]
  return ([run.offsets[r["stage"]] + r["step"] for r in rows], [_number(r[key]) for r in rows])


def _mark_stages(ax, runs: Sequence[RunLog]) -> None:
  """A dotted line where a stage of any run starts, the names of the stages starting there beside
  it."""
  starts: dict[int, list[str]] = {}
  for run in runs:
    for stage, offset in run.offsets.items():
      if stage not in starts.setdefault(offset, []):
        starts[offset].append(stage)
  for offset, stages in sorted(starts.items()):
    ax.axvline(offset, color="0.5", linestyle=":", linewidth=1)
    ax.text(offset, 1.0, " " + ", ".join(stages), transform=ax.get_xaxis_transform(), va="top",
            fontsize=7, color="0.4")


def _axes_style(ax, title: str, ylabel: str, runs: Sequence[RunLog]) -> None:
  _mark_stages(ax, runs)
  ax.set(title=title, xlabel="step (all stages)", ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def metric_figure(runs: Sequence[RunLog], key: str):
  """`key` of metrics.jsonl over the steps, one line per run; None where no run has it."""
  lines = [(i, run, *_series(run, run.metrics, key)) for i, run in enumerate(runs)]
  lines = [line for line in lines if line[2]]
  if not lines:
    return None
  fig, ax = pyplot().subplots(figsize=(6.4, 3.8))
  for i, run, x, y in lines:
    ax.plot(x, y, color=f"C{i}", label=run.label, marker="o" if len(x) < 12 else None, ms=3)
  _axes_style(ax, key, key, runs)
  fig.tight_layout()
  return fig


def accuracy_figure(runs: Sequence[RunLog]):
  """eval.jsonl accuracy over the steps, one panel per task; None where no run evaluated."""
  tasks = list(dict.fromkeys(r["task"] for run in runs for r in run.evals))
  if not tasks:
    return None
  fig, axes = pyplot().subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for i, run in enumerate(runs):
      x, y = _series(run, [r for r in run.evals if r["task"] == task], "accuracy")
      if x:
        ax.plot(x, y, color=f"C{i}", label=run.label, marker="o", ms=3)
    _axes_style(ax, f"{task}: accuracy", "accuracy", runs)
  fig.tight_layout()
  return fig


def figures(runs: Sequence[RunLog]) -> dict[str, Any]:
  """{file name: matplotlib figure} of every quantity some run has."""
  adv = sorted({k for run in runs for r in run.metrics for k in r if k.startswith("adv/")})
  quantities = list(QUANTITIES) + [("adv_" + k[4:].replace("/", "_"), k) for k in adv]
  out = {f"{name}.png": metric_figure(runs, key) for name, key in quantities}
  out["accuracy.png"] = accuracy_figure(runs)
  return {name: fig for name, fig in out.items() if fig is not None}


def _labels(workdirs: Sequence[str]) -> list[str]:
  """Each workdir's name, or its path where two share a name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def plot(workdirs: Sequence[str], out: str) -> list[str]:
  """Writes the figures of `workdirs` into `out`; returns the paths written."""
  runs = [load(w, label) for w, label in zip(workdirs, _labels(workdirs))]
  os.makedirs(out, exist_ok=True)
  plt, paths = pyplot(), []
  for name, fig in figures(runs).items():
    paths.append(os.path.join(out, name))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m corpo_jax.plot", description=__doc__.split(
      "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", action="append", required=True,
                      help="a run's workdir; repeat to overlay several runs")
  parser.add_argument("--out", help="where the PNGs go (default: WORKDIR/plots for one workdir, "
                                    "./plots for several)")
  args = parser.parse_args(argv)
  out = args.out or (os.path.join(args.workdir[0], "plots") if len(args.workdir) == 1 else "plots")
  for path in plot(args.workdir, out):
    print(path)


if __name__ == "__main__":
  main()
