"""Study 2 (issue 7): the thinking head. Four variants on 1-2 digit arithmetic, 3 seeds each:

  thinking=none    no thinking: warm start on plain answers (an empty <think></think> block),
                   no thinking head
  thinking=tokens  thinking as tokens only: the reference traces, no thinking head (0 layers)
  thinking=2, 4    the reference traces, a thinking head of 2 / 4 decoder layers
Each: a supervised warm start (the step classifier trains where there is a head), then GRPO with
the exact-match reward (the same objective for every variant; the thinking itself is measured,
not rewarded), evaluated after the warm start and every 20 RL steps: accuracy, pass@k,
transparency, step structure, coherence, alignment (eval.jsonl).

The warm start (600 steps) and the RL learning rate (5e-5) follow the demo's measurements
(docs/demo.md): 200-300 warm-start steps left the traces undertrained, and RL at lr >= 1e-4
lowered held-out accuracy.

A depth control (`thinking=tokens` with model.num_layers=4: as deep along the trace as 2 base
layers + a 2-layer head) separates the head from depth. Each variant and seed also runs RL at 4x
the learning rate (STRONG_RL_LR) from the same warm start: at 5e-5, 40 steps barely move the
policy (study 1 and this study's KL).

Run the study (4 variants x 3 seeds x 2 RL learning rates + 3 depth-control runs = 27 runs, 15
warm starts; tables and plots in workdir/sweeps/study_thinking/results.md):
  python launch/sweep.py --config=configs/study_thinking.py
One run:
  python -m corpo_jax.main --config=configs/study_thinking.py:thinking=2

Arguments (after the colon): thinking=none|tokens|<layers>, model=<preset>, seed=<int>,
workdir=<path>, smoke.
"""

from configs import common

VARIANTS = ("none", "tokens", "2", "4")
SEEDS = (0, 1, 2)
STRONG_RL_LR = 2e-4


def get_config(arg=None):
  arg = common.parse_arg(arg, thinking="tokens", model="demo", seed=0,
                         workdir="workdir/study_thinking", smoke=False)
  if arg.thinking not in ("none", "tokens") and not arg.thinking.isdigit():
    raise ValueError(f"thinking={arg.thinking!r}: choose none, tokens or a number of layers.")
  config = common.base_config(arg)
  config.stages = ("sft", "rl")
  config.sft = common.sft_stage(steps=600, learning_rate=3e-3, warmup_steps=20, decay_steps=580,
                                trace_share=float(arg.thinking != "none"))
  config.rl = common.rl_stage(steps=40, prompts_per_step=8, group_size=8, max_new_tokens=96,
                              advantage="grpo", scale="group", beta=0.1, learning_rate=5e-5,
                              warmup_steps=5, eval_every=20)
  config.eval.max_new_tokens = 96
  config = common.smoke(config) if arg.smoke else config
  config.model.thinking_layers = int(arg.thinking) if arg.thinking.isdigit() else 0  # 0: no head
  return config


def sweep(add):
  for thinking in VARIANTS:
    for seed in SEEDS:
      add(f"thinking={thinking}", seed=seed)
  # Depth control: thinking as tokens in a base of 4 layers, as deep as 2 base layers + a
  # 2-layer head along the trace.
  for seed in SEEDS:
    add("thinking=tokens", seed=seed, **{"model.num_layers": 4})
  # The same RL at 4x the learning rate, from the same warm starts (the sweep reuses them).
  for thinking in VARIANTS:
    for seed in SEEDS:
      add(f"thinking={thinking}", seed=seed, **{"rl.learning_rate": STRONG_RL_LR})
