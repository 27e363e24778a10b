"""Thinking-head pre-training (stage 1 of the thinking recipe): next-token loss on the trace
tokens plus the step-type classifier, with the base model frozen.

Run:
  python -m corpo_jax.main --config=configs/sft_thinking.py
  python -m corpo_jax.main --config=configs/sft_thinking.py --config.sft.traces=traces.jsonl
(traces.jsonl from `python -m corpo_jax.data.distill --input responses.jsonl --output traces.jsonl`)

Arguments (after the colon): model=<preset>, seed=<int>, workdir=<path>, smoke.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="demo", seed=0, workdir="workdir/sft_thinking", smoke=False)
  config = common.base_config(arg)
  config.stages = ("sft",)
  config.sft = common.sft_stage(steps=300, loss_on=("trace",), step_loss_weight=0.1,
                                learning_rate=1e-4, warmup_steps=20, decay_steps=280,
                                freeze=("base",))
  return common.smoke(config) if arg.smoke else config
