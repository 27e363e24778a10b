"""RL of a pretrained Hugging Face Mixtral on a user's JSONL task: thinking-head pre-training on
the task's traces, then RL with the chosen estimator (docs/pretrained.md).

Run:
  python -m corpo_jax.main --config=configs/pretrained.py:init_from=/ckpt/Mixtral-8x7B-v0.1,data=train.jsonl \
      --config.mesh='(1,16,4,1)'
  python -m corpo_jax.main --config=configs/pretrained.py:init_from=DIR,data=train.jsonl,advantage=corpo,reward=ordinal
  python -m corpo_jax.main --config=configs/pretrained.py:init_from=DIR,data=train.jsonl,smoke   # 3 steps a stage

Arguments (after the colon): init_from (a Hugging Face Mixtral directory with config.json,
*.safetensors and tokenizer.model), data (JSON lines {"prompt", "answer", "trace"}; a row without
a trace trains an empty think block, corpo_jax/data/tasks/jsonl.py), advantage (grpo | dr_grpo |
rloo | static | corpo), reward (exact_match: 0/1, tau 1; ordinal: the grade 1 or 5, tau 5),
prompt_format (plain | mistral_instruct | a template with {prompt}), thinking_layers (0: a plain
Mixtral that thinks in tokens), seed, workdir, smoke.
"""

from configs import common

SCALES = {"grpo": "group", "dr_grpo": "none", "rloo": "none", "static": "none", "corpo": "none"}


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", data="", advantage="grpo", reward="exact_match",
                         prompt_format="plain", thinking_layers=1, seed=0,
                         workdir="workdir/pretrained", smoke=False, model="mixtral_8x7b")
  if arg.advantage not in SCALES:
    raise ValueError(f"advantage={arg.advantage!r}: choose one of {sorted(SCALES)}.")
  if not arg.init_from:
    raise ValueError("configs/pretrained.py needs init_from=DIR, a Hugging Face Mixtral directory "
                     "(configs/pretrained.py:init_from=DIR,data=FILE); other configs take "
                     "--config.init_from=DIR.")
  if arg.reward not in ("exact_match", "ordinal"):
    raise ValueError(f"reward={arg.reward!r}: choose exact_match or ordinal.")
  config = common.base_config(arg)
  # The checkpoint's config.json sets the architecture; `model` (a preset) gives the training
  # choices: bfloat16 compute, float32 parameters and optimizer state, remat, and expert-parallel
  # MoE with a capacity factor of Mixtral's num_experts / top_k: no token is ever dropped, so
  # the update computes what transformers computes (corpo_jax/model/moe.py).
  config.model.update(moe_dispatch="expert_parallel", capacity_factor=4.0,
                      thinking_layers=arg.thinking_layers)
  config.init_from = arg.init_from
  config.prompt_format = arg.prompt_format
  config.tasks.jsonl.path = arg.data
  config.stages = ("sft", "rl")
  # Thinking-head pre-training: the base layers stay frozen; the embedding and unembedding train
  # so that the rows of the appended <think>/</think> can learn (docs/pretrained.md).
  config.sft = common.sft_stage(tasks=("jsonl",), steps=200, batch_size=32, learning_rate=1e-4,
                                warmup_steps=20, decay_steps=180, freeze=("layers", "final_norm"),
                                checkpoint_every=50)
  tau = 1.0 if arg.reward == "exact_match" else 5.0
  config.rl = common.rl_stage(
      tasks=("jsonl",), steps=200, prompts_per_step=16, group_size=8, max_new_tokens=512,
      max_prompt_len=512, temperature=1.0, rewards=((arg.reward, 1.0),),
      advantage=arg.advantage, scale=SCALES[arg.advantage], tau=tau, beta=0.04,
      learning_rate=1e-6, warmup_steps=10, num_micro_batches=4, checkpoint_every=20,
      rollout_layout="decode", reference_dtype="bfloat16")
  config.eval.update(tasks=("jsonl",), num_prompts=128, num_samples=4, ks=(1, 4),
                     max_new_tokens=512)
  if arg.smoke:
    config = common.smoke(config)
    config.model.update(moe_dispatch="expert_parallel", capacity_factor=4.0,
                        thinking_layers=arg.thinking_layers)
    config.rl.num_micro_batches = 1
  return config
