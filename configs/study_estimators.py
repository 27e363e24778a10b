"""Study 1 (issue 7): CoRPO vs GRPO vs static vs Dr. GRPO with ordinal rewards, 3 seeds each.

Per task (argument task=):
  verify      the ordinal verifier task: grade 1..5, tau 4; eval groups are the ground-truth
              configurations (both_right, first_right, second_right, both_wrong)
  arithmetic  1-2 digit arithmetic with ordinal partial credit (digits right): grade 1..5, tau 5
a supervised warm start on the task's reference traces, then RL whose reward is the raw grade,
evaluated after the warm start and every 20 RL steps. What the estimators do to failed
completions is in metrics.jsonl, every step: adv/frac_failed_positive (failures with A > 0) and
adv/pos_neg_ratio. The four estimators of a task and seed share one warm start (launch/sweep.py
trains it once).

The warm start (600 steps) and the RL learning rate (5e-5) follow the demo's measurements
(docs/demo.md): 200-300 warm-start steps left the traces undertrained, and RL at lr >= 1e-4
lowered held-out accuracy.

Run the study (4 estimators x 2 tasks x 3 seeds = 24 runs; tables and plots in
workdir/sweeps/study_estimators/results.md):
  python launch/sweep.py --config=configs/study_estimators.py
One run:
  python -m corpo_jax.main --config=configs/study_estimators.py:task=arithmetic \\
      --config.rl.advantage=grpo --config.rl.scale=group

Arguments (after the colon): task=verify|arithmetic, model=<preset>, seed=<int>,
workdir=<path>, smoke. The estimator is config.rl.advantage / config.rl.scale (default CoRPO).
"""

from configs import common

TAU = {"verify": 4.0, "arithmetic": 5.0}  # the tasks' failure thresholds (corpo_jax/data/tasks)
ESTIMATORS = (("corpo", "none"), ("grpo", "group"), ("static", "none"), ("dr_grpo", "none"))
SEEDS = (0, 1, 2)


def get_config(arg=None):
  arg = common.parse_arg(arg, task="verify", model="demo", seed=0,
                         workdir="workdir/study_estimators", smoke=False)
  if arg.task not in TAU:
    raise ValueError(f"task={arg.task!r}: choose one of {sorted(TAU)}.")
  config = common.base_config(arg)
  config.stages = ("sft", "rl")
  config.sft = common.sft_stage(steps=600, tasks=(arg.task,), learning_rate=3e-3, warmup_steps=20,
                                decay_steps=580)
  config.rl = common.rl_stage(
      steps=40, tasks=(arg.task,), prompts_per_step=8, group_size=8, max_new_tokens=96,
      rewards=(("ordinal", 1.0),), advantage="corpo", scale="none", tau=TAU[arg.task], beta=0.1,
      learning_rate=5e-5, warmup_steps=5, eval_every=20)
  config.eval.tasks = (arg.task,)
  config.eval.max_new_tokens = 96
  return common.smoke(config) if arg.smoke else config


def sweep(add):
  for task in TAU:
    for advantage, scale in ESTIMATORS:
      for seed in SEEDS:
        add(f"task={task}", seed=seed, **{"rl.advantage": advantage, "rl.scale": scale})
