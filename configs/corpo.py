"""CoRPO (baseline max(tau, group mean)) with ordinal rewards: supervised warm start -> RL -> specialisation on the bundled tasks.

The no-argument default is the CPU demo (see configs/common.py three_stage).
Run:
  python -m corpo_jax.main --config=configs/corpo.py
  python -m corpo_jax.main --config=configs/corpo.py:seed=1,reward=ordinal
  python -m corpo_jax.main --config=configs/corpo.py:smoke     # all stages, tiny model, seconds
  python -m corpo_jax.main --config=configs/corpo.py:model=mixtral_8x7b --config.mesh='(-1,8,4,1)'

Arguments (after the colon): model=<preset>, seed=<int>, workdir=<path>,
reward=exact_match|ordinal (default ordinal), smoke.

Sweep (estimator x tau x seed of the RL stage; results in workdir/sweeps/corpo):
  python launch/sweep.py --config=configs/corpo.py --dry-run
"""

from configs import common


def get_config(arg=None):
  return common.estimator_config(arg, advantage="corpo", scale="none", reward="ordinal")


def sweep(add):
  for advantage in ("corpo", "static"):
    for tau in (4.0, 5.0):
      for seed in (0, 1, 2):
        add(seed=seed, **{"rl.advantage": advantage, "rl.tau": tau})
