"""Ablation sweeps: expand a config's declared sweep into runs, run them, aggregate the results.

A config file declares its sweep beside `get_config` (big_vision style):

    def sweep(add):
      for advantage in ("corpo", "static"):
        for seed in (0, 1, 2):
          add(seed=seed, **{"rl.advantage": advantage})

`add(arg="", **overrides)` declares one run. Each override is a config field path and its value,
passed to the trainer as `--config.PATH=VALUE`; `arg` is appended to the config argument of the
command line (`--config=configs/x.py:smoke` and `add("task=verify")` run
`configs/x.py:smoke,task=verify`). A run's name lists its arg items and overrides in order
(`task=verify,advantage=corpo,seed=0`; a path is shortened to its last part unless two of the run's
overrides share it; the seed last), and its workdir is ROOT/NAME. Runs that differ only in `seed`
are one setting.

Usage (from the repository root; ROOT defaults to workdir/sweeps/<config name>[-<arg>]):
  python launch/sweep.py --config=configs/corpo.py --dry-run   # list the runs and their commands
  python launch/sweep.py --config=configs/corpo.py             # run them here, one after another
  python launch/sweep.py --config=configs/corpo.py --print     # print the unfinished runs' commands
  python launch/sweep.py --config=configs/corpo.py --tpu       # each via launch/tpu_vm.sh run + copy
  python launch/sweep.py --config=configs/corpo.py --aggregate-only
A run is finished when every stage's last checkpoint is marked done (corpo_jax/train/loop.py);
finished runs are skipped. Locally, a fresh run whose config agrees with another run's up to
some stage (e.g. the same warm start before different RL estimators) starts from that run's
finished stages instead of training them again (share_stages), and runs share a persistent XLA
compilation cache (ROOT/jax_cache, unless JAX_COMPILATION_CACHE_DIR is set). With --tpu,
launch/tpu_vm.sh takes its settings from the TPU_* environment variables, and ROOT must lie inside
the repository (the same relative path on the TPU VM). After running, launch/report.py writes
ROOT/results.md, runs.csv, settings.csv, training.csv and the PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from corpo_jax.train.metrics import read_jsonl  # noqa: E402
from launch import report  # noqa: E402

TPU_VM = os.path.join("launch", "tpu_vm.sh")
SEED = "seed"


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep. `workdir` is relative to the repository root when inside it."""

  name: str
  items: tuple[tuple[str, str], ...]  # (key, value) as in the name, arg items first
  flags: tuple[str, ...]  # trainer flags: --config=..., --config.PATH=VALUE, --config.workdir=...
  workdir: str
  stages: tuple[str, ...]
  stage_steps: tuple[int, ...]
  # prefix_keys[k]: the config without the workdir and the stages after stage k. Runs whose
  # keys agree up to k train their first k + 1 stages identically (share_stages).
  prefix_keys: tuple[str, ...] = dataclasses.field(repr=False)

  @property
  def seed(self) -> str:
    return dict(self.items).get(SEED, "")

  @property
  def setting(self) -> str:
    """The name without the seed: runs of one setting differ only in seed."""
    return ",".join(f"{k}={v}" for k, v in self.items if k != SEED) or "all"

  @property
  def path(self) -> str:
    return os.path.join(ROOT, self.workdir)


# ----------------------------------------------------------------------------- expansion


def flag_value(value: Any) -> str:
  """A Python value as ml_collections' config flags parse it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  raise ValueError(f"Sweep value {value!r}: use a str, bool, int, float or tuple.")


def name_value(value: Any) -> str:
  """A value as it appears in a run name (and so in a directory name)."""
  if isinstance(value, (tuple, list)):
    return "+".join(name_value(v) for v in value)
  text = flag_value(value)
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def run_items(arg: str, overrides: dict[str, Any]) -> list[tuple[str, str]]:
  items = []
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    items.append((key.strip(), name_value(value.strip()) if value else "true"))
  lasts = [path.rpartition(".")[2] for path in overrides]
  for path, value in overrides.items():
    last = path.rpartition(".")[2]
    items.append((last if lasts.count(last) == 1 else path, name_value(value)))
  return sorted(items, key=lambda item: item[0] == SEED)  # the seed last


def load_sweep(config_file: str) -> list[tuple[str, dict[str, Any]]]:
  """The (arg, overrides) of every add() call of the config file's sweep()."""
  if not os.path.isfile(config_file):
    raise ValueError(f"No config file {config_file!r}; e.g. --config=configs/corpo.py.")
  spec = importlib.util.spec_from_file_location("_sweep_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{config_file} declares no sweep(add) beside get_config; add one (see "
                     f"launch/sweep.py).")
  calls = []
  module.sweep(lambda arg="", **overrides: calls.append((arg, overrides)))
  if not calls:
    raise ValueError(f"The sweep() of {config_file} adds no runs.")
  return calls


def parse_config(argv: list[str]):
  """The config exactly as the trainer's --config flags build it."""
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config file",
                                           flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def _get(config, path: str) -> Any:
  for part in path.split("."):
    config = config[part]
  return config


def make_run(config_ref: str, arg: str, overrides: dict[str, Any], root: str) -> Run:
  items = run_items(arg, overrides)
  name = ",".join(f"{k}={v}" for k, v in items)
  path, _, base_arg = config_ref.partition(":")
  suffix = ":" + ",".join(filter(None, (base_arg, arg))) if base_arg or arg else ""
  workdir = os.path.join(root, name)
  field_flags = [f"--config.{field}={flag_value(v)}" for field, v in overrides.items()]
  field_flags.append(f"--config.workdir={workdir}")
  try:  # read the config file by its absolute path; the run's flags name it from the root
    config = parse_config(["sweep", f"--config={os.path.join(ROOT, path)}{suffix}", *field_flags])
  except Exception as e:  # absl and ml_collections raise several kinds for a bad flag
    raise ValueError(f"Sweep run {name!r} does not build: {e}") from None
  for field, value in overrides.items():
    got = _get(config, field)
    if got != (tuple(value) if isinstance(value, list) else value):
      raise ValueError(f"Sweep run {name!r}: --config.{field}={flag_value(value)} reads back as "
                       f"{got!r}, not {value!r}.")
  stages = tuple(config.stages)
  return Run(name, tuple(items), (f"--config={path}{suffix}", *field_flags), workdir, stages,
             tuple(int(config[s].steps) for s in stages), prefix_keys(config))


def prefix_keys(config) -> tuple[str, ...]:
  """Per stage k, what decides stages 0..k: everything but the workdir and later stages."""
  common = config.to_dict()
  for name in ("workdir", "stages", *config.stages):
    common.pop(name)
  return tuple(json.dumps({**common, "stages": config.stages[:k + 1],
                           **{s: config[s].to_dict() for s in config.stages[:k + 1]}},
                          sort_keys=True, default=repr)
               for k in range(len(config.stages)))


def expand(config_ref: str, root: str) -> list[Run]:
  """The runs of `config_ref`'s (`path[:arg]`) sweep, with workdirs under `root`."""
  runs = [make_run(config_ref, arg, overrides, root)
          for arg, overrides in load_sweep(os.path.join(ROOT, config_ref.partition(":")[0]))]
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"The sweep adds the same run more than once: {duplicates}.")
  return runs


def default_root(config_ref: str) -> str:
  path, _, arg = config_ref.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(ROOT, "workdir", "sweeps", stem + (f"-{name_value(arg)}" if arg else ""))


def repo_path(path: str) -> str:
  """`path` relative to the repository root when inside it (commands run from there)."""
  absolute = os.path.abspath(path)
  inside = os.path.commonpath([absolute, ROOT]) == ROOT
  return os.path.relpath(absolute, ROOT) if inside else absolute


# ----------------------------------------------------------------------------- running


def stage_done(workdir: str, stage: str) -> bool:
  """The stage's latest checkpoint is marked done (a rerun skips the stage)."""
  from corpo_jax.train.checkpoint import Checkpointer  # jax and orbax: only when needed
  directory = os.path.join(workdir, "checkpoints", stage)
  if not os.path.isdir(directory):
    return False
  ckpt = Checkpointer(directory, async_save=False)
  try:
    latest = ckpt.latest_step()
    return latest is not None and bool(ckpt.restore_meta(latest).get("done"))
  finally:
    ckpt.close()


def finished(run: Run) -> bool:
  return all(stage_done(run.path, stage) for stage in run.stages)


def share_stages(run: Run, runs: list[Run]) -> tuple[Run, int] | None:
  """Starts a fresh run from another run's finished first k stages when their configs agree up
  to there (prefix_keys): copies those stages' checkpoints and their metrics, eval and samples
  rows. The trainer then skips them, as on a resume. Returns (the other run, k) or None."""
  if os.path.exists(os.path.join(run.path, "checkpoints")):
    return None
  for k in range(len(run.stages), 0, -1):
    for other in runs:
      if (other is not run and other.prefix_keys[:k] == run.prefix_keys[:k]
          and all(stage_done(other.path, s) for s in run.stages[:k])):
        copy_stages(other.path, run.path, run.stages[:k])
        return other, k
  return None


def copy_stages(source: str, target: str, stages: tuple[str, ...]) -> None:
  for stage in stages:
    shutil.copytree(os.path.join(source, "checkpoints", stage),
                    os.path.join(target, "checkpoints", stage))
  for filename in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
    path = os.path.join(source, filename)
    if os.path.exists(path):
      rows = [r for r in read_jsonl(path) if r["stage"] in stages]
      with open(os.path.join(target, filename), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def commands(run: Run, tpu: bool) -> list[list[str]]:
  """The commands that run `run` (from the repository root)."""
  if not tpu:
    return [[sys.executable, "-m", "corpo_jax.main", *run.flags]]
  log_dir = os.path.join(run.workdir, "tpu_logs")
  return [[TPU_VM, f"--log-dir={log_dir}", "run", run.flags[0].removeprefix("--config="),
           *run.flags[1:]],
          [TPU_VM, "copy", run.workdir, os.path.dirname(run.workdir)]]


def execute(todo: list[Run], runs: list[Run], tpu: bool, env: dict[str, str]) -> list[str]:
  """Runs each run of `todo` in turn, output to <workdir>/sweep.log; locally, a fresh run first
  takes the stages it shares with another run of `runs`. Returns the names of failed runs."""
  failed = []
  for i, run in enumerate(todo, 1):
    os.makedirs(run.path, exist_ok=True)
    log = os.path.join(run.path, "sweep.log")
    shared = None if tpu else share_stages(run, runs)
    if shared:
      print(f"[{i}/{len(todo)}] {run.name}: stages {', '.join(run.stages[:shared[1]])} taken "
            f"from {shared[0].name}", flush=True)
    print(f"[{i}/{len(todo)}] {run.name}: running (output in {log})", flush=True)
    t0, rc = time.perf_counter(), 0
    with open(log, "a") as f:
      for cmd in commands(run, tpu):
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
          break
    if rc:
      status = f"FAILED (exit {rc}; see {log})"
      failed.append(run.name)
    else:  # the trainer also exits 0 after a preemption checkpoint
      status = "done" if finished(run) else "stopped early (rerun the sweep to resume it)"
    print(f"[{i}/{len(todo)}] {run.name}: {status} in {time.perf_counter() - t0:.0f}s", flush=True)
  return failed


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Expand a config's sweep(add) into runs, run them, aggregate the results.",
      epilog="See the module docstring of launch/sweep.py for the sweep declaration.")
  parser.add_argument("--config", required=True, help="config file[:arg], e.g. configs/corpo.py")
  parser.add_argument("--root", help="directory of the run workdirs and the results "
                                     "(default workdir/sweeps/<config name>[-<arg>])")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--dry-run", action="store_true", help="list the runs and their commands")
  mode.add_argument("--print", action="store_true", help="print the unfinished runs' commands")
  mode.add_argument("--aggregate-only", action="store_true", help="only write the results")
  parser.add_argument("--tpu", action="store_true",
                      help="run on a TPU VM through launch/tpu_vm.sh (settings: TPU_* env vars)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  path, colon, arg = args.config.partition(":")
  config_ref = repo_path(path) + colon + arg
  root = repo_path(args.root or default_root(config_ref))
  if args.tpu and os.path.isabs(root):
    raise ValueError(f"--tpu needs --root inside the repository ({ROOT}), not {root!r}: the "
                     f"runs write to the same relative path on the TPU VM.")
  runs = expand(config_ref, root)
  done = {r.name for r in runs if finished(r)}
  todo = [r for r in runs if r.name not in done]
  if args.dry_run:
    print(f"{len(runs)} runs of {args.config} under {root} ({len(done)} finished); commands run "
          f"from {ROOT}:")
    for run in runs:
      print(f"\n{run.name}{'  [finished]' if run.name in done else ''}")
      for cmd in commands(run, args.tpu):
        print(f"  {shlex.join(cmd)}")
    return 0
  if args.print:
    for run in todo:
      for cmd in commands(run, args.tpu):
        print(shlex.join(cmd))
    return 0
  failed = []
  if not args.aggregate_only:
    print(f"{len(runs)} runs under {root}: {len(done)} finished, {len(todo)} to run.", flush=True)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, root, "jax_cache"))
    failed = execute(todo, runs, args.tpu, env)
  written = report.write(runs, os.path.join(ROOT, root), title=args.config)
  print(f"results in {root}: {', '.join(written)}")
  if failed:
    print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except ValueError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    sys.exit(2)
