"""GRPO on the bundled tasks; the no-argument default is the CPU demo.

Run:
  python -m corpo_jax.main --config=configs/grpo.py
  python -m corpo_jax.main --config=configs/grpo.py:model=tiny,seed=1 --config.mesh='(2,2,2,1)'

Arguments (after the colon): model=<preset> (tiny, demo, mixtral_8x7b, mixtral_8x22b),
seed=<int>, workdir=<path>.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="demo", seed=0, workdir="workdir/grpo")
  config = common.base_config(arg)
  return config
