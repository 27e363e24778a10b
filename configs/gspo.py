"""GSPO (sequence-level importance ratio, group-std advantages): supervised warm start -> RL -> specialisation on the bundled tasks.

GSPO (arXiv 2507.18071) clips the sequence ratio exp(mean_t log r_t), which stays far closer to 1
than a token ratio, at 1 - 3e-4 and 1 + 4e-4 (the paper's ranges); the token-level 0.2 would
leave it unclipped. The clip acts only on updates after the first on a rollout batch
(`--config.rl.num_iterations=2` or more): on the first, every ratio is 1.
The no-argument default is the CPU demo (see configs/common.py three_stage).
Run:
  python -m corpo_jax.main --config=configs/gspo.py
  python -m corpo_jax.main --config=configs/gspo.py:smoke     # all stages, tiny model, seconds
  python -m corpo_jax.main --config=configs/gspo.py --config.rl.num_iterations=4

Arguments (after the colon): model=<preset>, seed=<int>, workdir=<path>,
reward=exact_match|ordinal (default exact_match), smoke.
"""

from configs import common

EPS_LOW, EPS_HIGH = 3e-4, 4e-4  # GSPO's clipping ranges of the sequence ratio


def get_config(arg=None):
  return common.estimator_config(arg, advantage="grpo", scale="group", reward="exact_match",
                                 name="gspo", importance_level="sequence", eps_low=EPS_LOW,
                                 eps_high=EPS_HIGH)
