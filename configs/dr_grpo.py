"""Dr. GRPO (group-mean baseline, no std scaling): supervised warm start -> RL -> specialisation on the bundled tasks.

The no-argument default is the CPU demo (see configs/common.py three_stage).
Run:
  python -m corpo_jax.main --config=configs/dr_grpo.py
  python -m corpo_jax.main --config=configs/dr_grpo.py:seed=1,reward=ordinal
  python -m corpo_jax.main --config=configs/dr_grpo.py:smoke     # all stages, tiny model, seconds
  python -m corpo_jax.main --config=configs/dr_grpo.py:model=mixtral_8x7b --config.mesh='(-1,8,4,1)'

Arguments (after the colon): model=<preset>, seed=<int>, workdir=<path>,
reward=exact_match|ordinal (default exact_match), smoke.
"""

from configs import common


def get_config(arg=None):
  return common.estimator_config(arg, advantage="dr_grpo", scale="none", reward="exact_match")
