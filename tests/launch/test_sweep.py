"""launch/sweep.py: expanding a config's sweep into runs and commands, and a tiny sweep end to end."""

import csv
import os
import subprocess
import sys

import pytest
from matplotlib import image

from launch import sweep
from corpo_jax.train.metrics import read_jsonl

PYTHON = sys.executable


def test_values_and_names():
  assert [sweep.flag_value(v) for v in (True, "corpo", 3, 0.5, ("verify",), [("ordinal", 1.0)])] \
      == ["true", "corpo", "3", "0.5", "('verify',)", "(('ordinal', 1.0),)"]
  assert sweep.name_value((("ordinal", 1.0),)) == "ordinal+1.0"
  assert sweep.name_value("a b/c") == "a_b_c"
  # Arg items first, the seed last; a last path part shared within the run keeps its full path.
  assert sweep.run_items("task=verify,smoke", {"seed": 2, "rl.tau": 4.0, "specialize.tau": 2.0,
                                               "rl.advantage": "static"}) == [
      ("task", "verify"), ("smoke", "true"), ("rl.tau", "4.0"), ("specialize.tau", "2.0"),
      ("advantage", "static"), ("seed", "2")]


def test_dry_run_lists_the_corpo_runs(tmp_path, capsys):
  root = str(tmp_path / "s")
  assert sweep.main(["--config=configs/corpo.py", f"--root={root}", "--dry-run"]) == 0
  out = capsys.readouterr().out.splitlines()
  names = [f"advantage={a},tau={t},seed={s}" for a in ("corpo", "static") for t in ("4.0", "5.0")
           for s in (0, 1, 2)]
  assert out[0] == (f"12 runs of configs/corpo.py under {root} (0 finished); commands run from "
                    f"{sweep.ROOT}:")
  assert [line for line in out[1:] if line and not line.startswith("  ")] == names
  assert out[3] == (f"  {PYTHON} -m corpo_jax.main --config=configs/corpo.py --config.seed=0 "
                    f"--config.rl.advantage=corpo --config.rl.tau=4.0 "
                    f"--config.workdir={root}/advantage=corpo,tau=4.0,seed=0")


def test_runs_build_the_trainer_config():
  runs = sweep.expand("configs/corpo.py:smoke", "workdir/sweeps/x")
  run = runs[-1]
  assert run.name == "advantage=static,tau=5.0,seed=2" and run.setting == "advantage=static,tau=5.0"
  assert run.flags == ("--config=configs/corpo.py:smoke", "--config.seed=2",
                       "--config.rl.advantage=static", "--config.rl.tau=5.0",
                       f"--config.workdir=workdir/sweeps/x/{run.name}")
  assert run.stages == ("sft", "rl", "specialize") and run.stage_steps == (3, 3, 3)
  config = sweep.parse_config(["x", run.flags[0].replace("configs", f"{sweep.ROOT}/configs"),
                               *run.flags[1:]])
  assert (config.seed, config.rl.advantage, config.rl.tau) == (2, "static", 5.0)
  assert config.workdir == "workdir/sweeps/x/" + run.name


def test_tpu_commands(capsys):
  assert sweep.main(["--config=configs/corpo.py:smoke", "--root=workdir/sweeps/t", "--tpu",
                     "--print"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 24
  assert lines[:2] == [
      "launch/tpu_vm.sh --log-dir=workdir/sweeps/t/advantage=corpo,tau=4.0,seed=0/tpu_logs run "
      "configs/corpo.py:smoke --config.seed=0 --config.rl.advantage=corpo --config.rl.tau=4.0 "
      "--config.workdir=workdir/sweeps/t/advantage=corpo,tau=4.0,seed=0",
      "launch/tpu_vm.sh copy workdir/sweeps/t/advantage=corpo,tau=4.0,seed=0 workdir/sweeps/t"]
  with pytest.raises(ValueError, match="--tpu needs --root inside the repository"):
    sweep.main(["--config=configs/corpo.py", "--root=/tmp/elsewhere", "--tpu", "--print"])


def _config_file(tmp_path, body):
  path = tmp_path / "cfg.py"
  path.write_text("from configs import grpo\n\ndef get_config(arg=None):\n"
                  "  return grpo.get_config(arg)\n\n" + body)
  return str(path)


@pytest.mark.parametrize("body, message", [
    ("", "declares no sweep"),
    ("def sweep(add):\n  pass\n", "adds no runs"),
    ("def sweep(add):\n  add(seed=1)\n  add(seed=1)\n", r"more than once: \['seed=1'\]"),
    ("def sweep(add):\n  add(**{'rl.taux': 1.0})\n", "'taux=1.0' does not build.*tau"),
    ("def sweep(add):\n  add(**{'rl.tau': 'high'})\n", "'tau=high' does not build"),
    ("def sweep(add):\n  add(**{'rl.tasks': 'verify'})\n", "reads back as \\('verify',\\)"),
])
def test_bad_sweeps(tmp_path, body, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(_config_file(tmp_path, body), "r")


TINY = """
def get_config(arg=None):
  config = grpo.get_config("smoke")  # then smaller still: one 3-step RL stage, no thinking head
  config.stages = ("rl",)
  config.rl.steps, config.rl.max_new_tokens = 3, 8
  config.model.thinking_layers = 0
  config.eval.update(tasks=("arithmetic",), num_prompts=2, max_new_tokens=8)
  config.checkpoint.async_save = False
  return config


def sweep(add):
  for seed in (0, 1):
    add(seed=seed)
"""


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, capsys):
  config = tmp_path / "tiny.py"
  config.write_text("from configs import grpo\n" + TINY)
  root = tmp_path / "sweep"
  cmd = [PYTHON, os.path.join(sweep.ROOT, "launch", "sweep.py"), f"--config={config}",
         f"--root={root}"]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "2 runs under" in result.stdout and "0 finished, 2 to run" in result.stdout
  assert os.listdir(root / "jax_cache")  # the second run reused the first one's compiles

  # runs.csv: one row per run (group "all") and per eval group, numbers as in eval.jsonl.
  with open(root / "runs.csv") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert reader.fieldnames == ["run", "setting", "seed", "task", "group", "accuracy", "pass@1",
                               "pass@2", "transparency", "structure", "coherence", "alignment",
                               "count"]
  for seed in ("0", "1"):
    final = read_jsonl(str(root / f"seed={seed}" / "eval.jsonl"))[-1]
    mine = [r for r in rows if r["run"] == f"seed={seed}"]
    assert [(r["task"], r["group"]) for r in mine] == [
        ("arithmetic", "all"), *(("arithmetic", g) for g in final["groups"])]
    assert float(mine[0]["accuracy"]) == final["accuracy"]
    assert float(mine[0]["pass@2"]) == final["pass_at_k"]["2"]
    assert mine[0]["setting"] == "all" and mine[0]["seed"] == seed
  # training.csv: the mean of frac_failed_positive over each run's 3 steps.
  with open(root / "training.csv") as f:
    training = list(csv.DictReader(f))
  assert [(r["run"], r["stage"], r["steps"]) for r in training] == [
      ("seed=0", "rl", "3"), ("seed=1", "rl", "3")]
  metrics = read_jsonl(str(root / "seed=1" / "metrics.jsonl"))
  assert float(training[1]["frac_failed_positive"]) == pytest.approx(
      sum(r["adv/frac_failed_positive"] for r in metrics) / 3)
  with open(root / "settings.csv") as f:
    setting = next(csv.DictReader(f))
  assert (setting["setting"], setting["group"], setting["seeds"]) == ("all", "all", "2")
  accuracies = [float(r["accuracy"]) for r in rows if r["group"] == "all"]
  assert float(setting["accuracy_mean"]) == pytest.approx(sum(accuracies) / 2)
  md = (root / "results.md").read_text()
  assert "2 runs, 2 with a final evaluation" in md and "| all | arithmetic | 2 |" in md
  for name in ("reward", "frac_failed_positive", "pos_neg_ratio", "accuracy"):
    png = root / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.imread(str(png)).shape[2] == 4 and f"![{name}]({name}.png)" in md

  # Both runs now count as finished: a second call has nothing left to run.
  assert all(sweep.finished(run) for run in sweep.expand(str(config), str(root)))
  assert sweep.main([f"--config={config}", f"--root={root}", "--print"]) == 0
  assert capsys.readouterr().out == ""


def test_study_sweeps():
  estimators = sweep.expand("configs/study_estimators.py", "r")
  assert len(estimators) == 24 and len({r.setting for r in estimators}) == 8
  assert estimators[3].name == "task=verify,advantage=grpo,scale=group,seed=0"
  assert estimators[-1].name == "task=arithmetic,advantage=dr_grpo,scale=none,seed=2"
  assert estimators[0].stages == ("sft", "rl") and estimators[0].stage_steps == (600, 40)
  thinking = sweep.expand("configs/study_thinking.py", "r")
  assert len(thinking) == 27 and [r.name for r in thinking[::3]] == [
      *(f"thinking={v},seed=0" for v in ("none", "tokens", "2", "4")),
      "thinking=tokens,num_layers=4,seed=0",
      *(f"thinking={v},learning_rate=0.0002,seed=0" for v in ("none", "tokens", "2", "4"))]
  built = {}
  for run in (estimators[3], estimators[12], *thinking[:15:3], thinking[18]):
    flags = [run.flags[0].replace("configs/", f"{sweep.ROOT}/configs/"), *run.flags[1:]]
    built[run.name] = sweep.parse_config(["x", *flags])
  verify, arithmetic = built[estimators[3].name], built[estimators[12].name]
  assert (verify.rl.tasks, verify.eval.tasks, verify.rl.tau, verify.rl.scale) == (
      ("verify",), ("verify",), 4.0, "group")
  assert (arithmetic.sft.tasks, arithmetic.rl.tau, arithmetic.rl.rewards) == (
      ("arithmetic",), 5.0, (("ordinal", 1.0),))
  assert [(c.model.num_layers, c.model.thinking_layers, c.sft.trace_share)
          for c in list(built.values())[2:7]] == [
              (2, 0, 0.0), (2, 0, 1.0), (2, 2, 1.0), (2, 4, 1.0), (4, 0, 1.0)]
  # The 4x learning-rate run starts from the same warm start (the sweep trains it once).
  tokens, strong = built[thinking[3].name], built[thinking[18].name]
  assert (tokens.rl.learning_rate, strong.rl.learning_rate) == (5e-5, 2e-4)
  assert sweep.prefix_keys(tokens)[0] == sweep.prefix_keys(strong)[0]
  assert sweep.prefix_keys(tokens)[1] != sweep.prefix_keys(strong)[1]


def _finish_stage(workdir, stage, steps):
  """A checkpoint marked done, as the trainer leaves a finished stage."""
  import jax.numpy as jnp
  from corpo_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage), async_save=False)
  ckpt.save(steps, {"x": jnp.zeros(())}, {"stage": stage, "step": steps, "done": True})
  ckpt.close()


def test_runs_share_their_common_first_stages(tmp_path):
  config = _config_file(tmp_path, "def sweep(add):\n"
                        "  for beta in (0.1, 0.2):\n"
                        "    add('smoke', seed=0, **{'rl.beta': beta})\n"
                        "  add('smoke', seed=1, **{'rl.beta': 0.1})\n")
  runs = sweep.expand(config, str(tmp_path / "s"))
  first, other_beta, other_seed = runs
  assert first.prefix_keys[0] == other_beta.prefix_keys[0] != other_seed.prefix_keys[0]
  assert first.prefix_keys[1] != other_beta.prefix_keys[1]
  assert sweep.share_stages(other_beta, runs) is None  # nothing finished yet
  _finish_stage(first.path, "sft", 3)
  _finish_stage(first.path, "rl", 3)
  with open(os.path.join(first.path, "metrics.jsonl"), "w") as f:
    f.writelines(f'{{"stage": "{s}", "step": {k}}}\n' for s in ("sft", "rl") for k in (1, 2, 3))
  assert sweep.share_stages(other_seed, runs) is None  # another seed trains another sft
  assert sweep.share_stages(other_beta, runs) == (first, 1)  # the same sft, another rl
  assert sweep.stage_done(other_beta.path, "sft") and not sweep.stage_done(other_beta.path, "rl")
  assert [(r["stage"], r["step"]) for r in read_jsonl(
      os.path.join(other_beta.path, "metrics.jsonl"))] == [("sft", 1), ("sft", 2), ("sft", 3)]
  assert not os.path.exists(os.path.join(other_beta.path, "eval.jsonl"))
  assert sweep.share_stages(other_beta, runs) is None  # it has checkpoints of its own now
