"""Paired evaluation for study 1 (docs/study_estimators.md): the warm start and each
estimator's final policy of one seed, evaluated on the same held-out prompts with the same
sampling rng (common random numbers), one JSON row per policy appended to OUT.

usage (from the repository root, after the sweep):
  python docs/study_estimators/paired_eval.py workdir/sweeps/study_estimators verify 0 256 out.jsonl
"""
import json, os, shutil, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax, ml_collections
from corpo_jax.train import loop
from corpo_jax.train import setup as setup_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train import state as state_lib

root, task, seed, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
runs = {"sft": f"task={task},advantage=corpo,scale=none,seed={seed}"}
for adv, scale in (("corpo", "none"), ("grpo", "group"), ("static", "none"), ("dr_grpo", "none")):
  runs[adv] = f"task={task},advantage={adv},scale={scale},seed={seed}"
for policy, name in runs.items():
  src = os.path.join(root, name)
  tmp = tempfile.mkdtemp()
  shutil.copy(os.path.join(src, "config.json"), tmp)
  with open(os.path.join(tmp, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.workdir = tmp
  config.eval.num_prompts = n
  run = setup_lib.setup(config)
  stage = "sft" if policy == "sft" else "rl"
  ckpt = Checkpointer(os.path.join(src, "checkpoints", stage))
  _, optimizer = setup_lib.stage_optimizer(run, stage)
  state, _ = ckpt.restore(ckpt.latest_step(), state_lib.abstract_state(run.cfg, optimizer, run.mesh))
  ckpt.close()
  rng = jax.random.fold_in(jax.random.key(12345 + seed), 0)  # the same for every policy
  rows = loop._evaluate(run, state.params, stage, 0, rng)
  with open(out, "a") as f:
    for r in rows:
      f.write(json.dumps({"seed": seed, "policy": policy, "task": r["task"], "accuracy": r["accuracy"],
                          "pass_at_k": r["pass_at_k"], "groups": r.get("groups", {})}) + "\n")
  print(seed, policy, rows[0]["accuracy"], flush=True)
  shutil.rmtree(tmp)
