"""Tables and the figure of study 2 (docs/study_thinking.md), from the sweep's runs after
paired_eval.py: per variant, mean and std over seeds of the paired 512-problem evaluation of
the warm start and the RL policy, and the RL training metrics.

usage (from the repository root):
  python docs/study_thinking/tables.py workdir/sweeps/study_thinking docs/study_thinking
Prints markdown tables; writes accuracy.png, thinking.png and paired_eval.csv to the out dir.
"""
import csv
import glob
import json
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from corpo_jax.train.metrics import read_jsonl  # pylint: disable=g-import-not-at-top

VARIANTS = ("none", "tokens", "tokens-4L", "2", "4")
LABELS = {"none": "no thinking", "tokens": "tokens only (0 layers)",
          "tokens-4L": "tokens only, 4 base layers", "2": "2-layer head", "4": "4-layer head"}
EVAL_KEYS = ("accuracy", "pass@4", "transparency", "structure", "coherence", "alignment",
             "accuracy_thinking", "accuracy_direct")


def runs(root):
  """{(variant, RL learning rate): {seed: run dir}} of the runs with both paired evaluations."""
  out = {}
  for path in glob.glob(os.path.join(root, "thinking=*,seed=*")):
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    variant = re.match(r"thinking=(\w+),", os.path.basename(path)).group(1)
    if config["model"]["num_layers"] != 2:
      variant += f"-{config['model']['num_layers']}L"
    evals = os.path.join(path, "eval512.jsonl")
    stages = {r["stage"] for r in read_jsonl(evals)} if os.path.exists(evals) else set()
    if stages >= {"sft", "rl"}:
      out.setdefault((variant, config["rl"]["learning_rate"]), {})[config["seed"]] = path
  return out


def paired(path):
  """{stage: {key: value}} of a run's paired evaluation (the arithmetic task's row)."""
  rows = {}
  for r in read_jsonl(os.path.join(path, "eval512.jsonl")):
    rows[r["stage"]] = {**{k: r[k] for k in EVAL_KEYS if k in r}, "pass@4": r["pass_at_k"]["4"]}
  return rows


def training(path):
  """RL training metrics: means over the first and the last 10 steps."""
  rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
  rl = [r for r in rows if r["stage"] == "rl"]
  mean = lambda rows, k: statistics.mean(r[k] for r in rows)
  first, last = rl[:10], rl[-10:]
  out = {key: (mean(first, key), mean(last, key))
         for key in ("reward/mean", "reward/frac_zero_std", "completion/length_mean", "kl",
                     "entropy")}
  out["sft_s_per_step"] = statistics.median(r["time/step_s"] for r in rows if r["stage"] == "sft")
  with open(os.path.join(path, "sweep.log")) as f:
    out["params_M"] = float(re.search(r"model ([0-9.]+)M parameters", f.read()).group(1))
  return out


def fmt(values, digits=3):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(root, out_dir):
  found = runs(root)
  lrs = sorted({lr for _, lr in found})
  settings = [(v, lr) for lr in lrs for v in VARIANTS if (v, lr) in found]
  data = {k: {s: (paired(p), training(p)) for s, p in sorted(found[k].items())} for k in settings}
  label = lambda k: f"{LABELS[k[0]]}, RL lr {k[1]:g}"

  print("| variant | params | seeds | accuracy after sft | after rl | change (paired) | "
        "pass@4 sft -> rl |")
  print("|---|---|---|---|---|---|---|")
  for v in settings:
    seeds = data[v]
    ev = lambda stage, k: [seeds[s][0][stage][k] for s in seeds]
    change = [seeds[s][0]["rl"]["accuracy"] - seeds[s][0]["sft"]["accuracy"] for s in seeds]
    print(f"| {label(v)} | {seeds[min(seeds)][1]['params_M']:.2f}M | {len(seeds)} | "
          f"{fmt(ev('sft', 'accuracy'))} | {fmt(ev('rl', 'accuracy'))} | {fmt(change)} | "
          f"{fmt(ev('sft', 'pass@4'), 2)} -> {fmt(ev('rl', 'pass@4'), 2)} |")

  print("\n| variant | stage | transparency | structure | coherence | alignment | "
        "accuracy when thinking | accuracy when answering directly |")
  print("|---|---|---|---|---|---|---|---|")
  for v in settings:
    for stage in ("sft", "rl"):
      ev = lambda k: [data[v][s][0][stage].get(k) for s in data[v]]
      print(f"| {label(v)} | {stage} | " + " | ".join(
          fmt(ev(k)) for k in ("transparency", "structure", "coherence", "alignment",
                               "accuracy_thinking", "accuracy_direct")) + " |")

  print("\n| variant | reward, RL steps 1-10 -> 31-40 | groups with zero reward std | "
        "completion length | KL (last 10) | SFT s/step |")
  print("|---|---|---|---|---|---|")
  for v in settings:
    tr = [data[v][s][1] for s in data[v]]
    pair = lambda k: f"{fmt([t[k][0] for t in tr])} -> {fmt([t[k][1] for t in tr])}"
    print(f"| {label(v)} | {pair('reward/mean')} | {pair('reward/frac_zero_std')} | "
          f"{pair('completion/length_mean')} | {fmt([t['kl'][1] for t in tr], 4)} | "
          f"{fmt([t['sft_s_per_step'] for t in tr], 2)} |")

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "paired_eval.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "rl_lr", "seed", "stage", *EVAL_KEYS])
    for v in settings:
      for s, (ev, _) in data[v].items():
        for stage in ("sft", "rl"):
          w.writerow([*v, s, stage, *[ev[stage].get(k) for k in EVAL_KEYS]])

  # One bar per policy: the warm start, then RL at each learning rate (dots: seeds).
  variants = [v for v in VARIANTS if any((v, lr) in data for lr in lrs)]
  policies = [("sft", lrs[0], "after sft", "tab:gray")] + [
      ("rl", lr, f"after rl, lr {lr:g}", color) for lr, color in zip(lrs, ("tab:blue", "tab:red"))]
  width = 0.8 / len(policies)

  def bars(ax, key, dots):
    for j, (stage, lr, name, color) in enumerate(policies):
      for i, v in enumerate(variants):
        if (v, lr) not in data:
          continue
        vals = [ev[stage][key] for ev, _ in data[(v, lr)].values()]
        x = i + (j - (len(policies) - 1) / 2) * width
        ax.bar(x, statistics.mean(vals), width=width * 0.9, color=color, alpha=0.6,
               label=name if i == 0 else None)
        if dots:
          ax.scatter([x] * len(vals), vals, color=color, s=12, zorder=3)
    ax.set_xticks(range(len(variants)), [LABELS[v].replace(", ", ",\n").replace(" (", "\n(") if dots else v
                                         for v in variants])

  fig, ax = plt.subplots(figsize=(8, 4))
  bars(ax, "accuracy", dots=True)
  ax.set_ylabel("accuracy (512 held-out problems x 4 samples)")
  ax.set_title("Study 2: 2-digit arithmetic, paired evaluation (dots: seeds)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)

  keys = ("transparency", "structure", "coherence", "alignment")
  fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.2), sharey=True)
  for ax, k in zip(axes, keys):
    bars(ax, k, dots=False)
    ax.set_title(k)
  axes[0].legend(fontsize=7)
  axes[0].set_ylabel("mean over seeds")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "thinking.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
