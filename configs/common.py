"""Shared defaults and argument parsing for the experiment configs.

A config file is `configs/NAME.py` with `get_config(arg)`; the part after the colon in
`--config=configs/grpo.py:model=tiny,seed=3` is `arg`, parsed by `parse_arg`. Any field can then
be overridden with `--config.FIELD=VALUE`; the config is locked, so a misspelt field fails with
"did you mean ...".

Layout of a config (every field is read by corpo_jax/train/loop.py):
  seed, workdir, mesh, dcn_mesh, model.*      the run
  init_from, new_token_init                   start from a pretrained Hugging Face Mixtral
  tokenizer, prompt_format, literal_think_tags   text -> tokens
  tasks.<name>.*                              task options (corpo_jax/data/tasks); a new name
                                              is a user data task (TaskConfigs)
  stages                                      names of the stage sub-configs to run, in order
  <stage>.*                                   one sub-config per stage: kind "sft" or "rl"
  eval.*, checkpoint.*, log.*                 evaluation, checkpoints, logging
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from corpo_jax.model.config import TOKENIZER_FIELDS, ModelConfig
from corpo_jax.rl.config import RLConfig

# RLConfig fields the loop derives from the stage's sampling settings (not set by hand).
DERIVED_RL_FIELDS = ("temperature", "max_completion_len")
SFT_OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "decay_steps", "weight_decay", "b1", "b2",
                        "grad_clip_norm", "freeze")


# A user's rows (corpo_jax/data/tasks/jsonl.py, docs/data.md): config.tasks.jsonl and every task a
# flag declares (TaskConfigs).
USER_TASK = {
    "kind": "jsonl",
    "path": "",  # x.jsonl, x.parquet (the parquet extra), or hf:NAME[:CONFIG]:SPLIT (datasets)
    "eval_path": "",  # "" = eval_fraction of the rows, chosen by a hash of the prompt
    "eval_fraction": 0.1,
    "prompt_key": "prompt",  # the row field holding the prompt
    "answer_key": "answer",  # the row field holding the answer
    "answer_regex": "",  # e.g. "#### (.*)": the reference answer is its first group
    "reward": "exact_match",  # the task's grading: "exact_match" or "numeric" (within tolerance)
    "tolerance": 1e-6,
    "weight": 1.0,  # share of an RL stage's prompts relative to the stage's other tasks
}


class TaskConfigs(ml_collections.ConfigDict):
  """config.tasks, whose flags can declare tasks: the first flag that reaches a name not
  configured yet adds it as a user data task (USER_TASK), locked config or not, so
  `--config.tasks.gsm.path=gsm.jsonl --config.tasks.gsm.prompt_key=question` declares task "gsm".
  A name close to a configured one (`arithmetc`) is not declared: the usual "did you mean" error.
  Other kinds of task are declared in the config file."""

  def __getattr__(self, name: str):
    if (name.startswith("_") or not name.isidentifier()
        or difflib.get_close_matches(name, list(self.keys()), 1, 0.75)):
      return super().__getattr__(name)
    with self.unlocked():
      self[name] = USER_TASK
    return self[name]


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2,flag" into a ConfigDict typed like `defaults`.

  A bare name sets a boolean to True. Unknown names are an error listing the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value: {key}=...")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} must be true or false.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Every ModelConfig field of a preset but the special token ids (the trainer takes those from
  its tokenizer), so any of them can be overridden by flag (`--config.model.num_layers=2`);
  corpo_jax.model.ModelConfig.from_dict reads it back. With config.init_from, the checkpoint's
  config.json sets the architecture fields (corpo_jax/model/pretrained.py)."""
  fields = ModelConfig.preset(preset, **overrides).to_dict()
  return ml_collections.ConfigDict({k: v for k, v in fields.items() if k not in TOKENIZER_FIELDS})


def rl_fields(**overrides: Any) -> dict[str, Any]:
  """Every RLConfig field but the derived ones (see corpo_jax/rl/config.py for each field)."""
  fields = RLConfig(**overrides).to_dict()
  for name in DERIVED_RL_FIELDS:
    fields.pop(name)
  fields["freeze"] = tuple(fields["freeze"])
  return fields


def sft_stage(**overrides: Any) -> ml_collections.ConfigDict:
  """Supervised warm start on reasoning traces (thinking-head pre-training with freeze=("base",))."""
  stage = ml_collections.ConfigDict()
  stage.kind = "sft"
  stage.steps = 200  # optimizer steps
  stage.batch_size = 32  # sequences per step
  stage.tasks = ("arithmetic",)  # a generated task whose reference traces are the data
  stage.traces = ""  # or a traces.jsonl written by `python -m corpo_jax.data.distill`
  stage.trace_share = 1.0  # share of rows trained with their trace; the rest answer plainly
  stage.loss_on = ("trace", "answer")  # target tokens: "trace" (thinking head), "answer" (base)
  stage.step_loss_weight = 0.1  # weight of the thinking head's step-type classifier loss
  # Optimizer (RLConfig's optimizer fields): AdamW, warmup then cosine decay, clipping, freeze.
  optimizer = rl_fields(learning_rate=1e-4, warmup_steps=20, decay_steps=180)
  stage.update({k: optimizer[k] for k in SFT_OPTIMIZER_FIELDS})
  stage.checkpoint_every = 100
  stage.eval_every = 0  # 0: evaluate only at the end of the stage
  stage.max_skipped_steps = 10  # stop once more steps than this had a non-finite loss or grad
  stage.update(overrides)
  return stage


def rl_stage(**overrides: Any) -> ml_collections.ConfigDict:
  """Rollout -> rewards -> update. Holds every RLConfig field (`--config.rl.advantage=corpo`)
  besides the stage's own: steps, tasks, batch and sampling settings, rewards."""
  stage = ml_collections.ConfigDict(rl_fields(beta=0.1, learning_rate=1e-5, warmup_steps=5))
  stage.kind = "rl"
  stage.steps = 100  # RL steps (one rollout batch each)
  stage.tasks = ("arithmetic",)
  stage.prompts_per_step = 4  # B prompts per step
  stage.group_size = 8  # G completions per prompt
  stage.max_new_tokens = 64  # also the update's max_completion_len
  stage.temperature = 0.8  # also the temperature of the update's log-probs
  stage.top_k = 0  # 0: off
  stage.top_p = 1.0  # 1.0: off
  stage.max_thinking_tokens = 0  # 0: no thinking budget; else force </think> after this many
  # Strings that end a completion (e.g. ("\n\nQuestion:",)): the tokens through the one that
  # completes the first are kept and trained on, the rest masked out (corpo_jax/rl/rollout.py)
  stage.stop = ()
  # "train": sample with the trainer's parameters; "decode": with a copy in the compute dtype
  # laid out for decoding (fsdp folded into tensor; corpo_jax/sharding.py decode_mesh), made
  # every step: what a large model on a pod needs (docs/scale.md)
  stage.rollout_layout = "train"
  stage.max_prompt_len = 256  # prompt tokens (with <bos>); longer ones are handled by long_prompts
  stage.long_prompts = "reject"  # "reject": stop naming the row; "truncate": keep the last tokens
  stage.rewards = (("exact_match", 1.0),)  # (name, weight) pairs, corpo_jax/rl/rewards.py
  stage.checkpoint_every = 20
  stage.eval_every = 0
  stage.samples_every = 10  # log two decoded completions every this many steps (0: never)
  stage.max_skipped_steps = 10  # stop once more steps than this had a non-finite loss or grad
  stage.update(overrides)
  return stage


def three_stage(config: ml_collections.ConfigDict, *, advantage: str, scale: str,
                reward: str, **rl: Any) -> ml_collections.ConfigDict:
  """The thinking recipe on the bundled tasks: a supervised warm start on reasoning traces, RL on
  arithmetic, then specialisation on 3-digit arithmetic with the composite thinking reward.

  Our demo model starts from random weights, so the warm start trains every parameter; with a
  pre-trained base, `--config.sft.freeze='("base",)'` is the recipe's thinking-head
  pre-training. reward: "exact_match" (0/1, tau 1) or "ordinal" (the task grade 1..5, tau 5).
  rl: further RLConfig fields of both RL stages (e.g. GSPO's importance_level and clip range).
  """
  if reward not in ("exact_match", "ordinal"):
    raise ValueError(f"reward={reward!r}: choose exact_match or ordinal.")
  tau = 1.0 if reward == "exact_match" else 5.0
  config.stages = ("sft", "rl", "specialize")
  # A quarter of the warm-start rows answer plainly (an empty think block): RL then has a
  # behaviour to choose, and learns to think on every problem because traced answers score higher
  # (docs/demo.md: transparency 0.82 -> 0.97, held-out accuracy up by about 0.1).
  config.sft = sft_stage(steps=600, learning_rate=3e-3, warmup_steps=20, decay_steps=580,
                         trace_share=0.75)
  estimator = dict(advantage=advantage, scale=scale, tau=tau, beta=0.1, **rl)
  config.rl = rl_stage(steps=60, prompts_per_step=8, max_new_tokens=96, rewards=((reward, 1.0),),
                       learning_rate=5e-5, warmup_steps=5, **estimator)
  # Mixed rewards: tau moves to the scale of the weighted sum (a perfect answer with a perfect
  # trace scores tau + 0.5 at most; exactly-right answers have reward >= tau).
  config.specialize = rl_stage(
      steps=20, tasks=("arithmetic3",), prompts_per_step=8, max_new_tokens=128,
      rewards=((reward, 0.5), ("thinking", 0.5)), learning_rate=1e-4,
      **dict(estimator, tau=0.5 * tau))
  config.eval.tasks = ("arithmetic", "arithmetic3")
  config.eval.max_new_tokens = 128
  return config


def estimator_config(arg: str | None, *, advantage: str, scale: str, reward: str,
                     name: str = "", **rl: Any) -> ml_collections.ConfigDict:
  """The get_config of configs/{grpo,corpo,static,dr_grpo,gspo}.py: the three-stage recipe with
  one advantage estimator (and the RLConfig fields `rl`), its workdir workdir/<name or
  advantage>. Arguments: model, seed, workdir, reward, smoke."""
  arg = parse_arg(arg, model="demo", seed=0, workdir=f"workdir/{name or advantage}",
                  reward=reward, smoke=False)
  config = three_stage(base_config(arg), advantage=advantage, scale=scale, reward=arg.reward,
                       **rl)
  return smoke(config) if arg.smoke else config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds: the tiny model with one base layer (and its thinking head), a
  few steps per stage, small batches. Its wall time is compilation, which the layer count
  drives (the sampler unrolls the layers): the end-to-end tests run it."""
  config.model = model_config("tiny", vocab_size=1024, num_layers=1)
  for name in config.stages:
    stage = config[name]
    stage.steps = 3
    stage.checkpoint_every = 2
    if stage.kind == "sft":
      stage.batch_size = 8
    else:
      stage.prompts_per_step, stage.group_size, stage.max_new_tokens = 2, 4, 24
  # Evaluation batches shaped like the RL stages' rollouts (2 prompts x 4 samples, 24 tokens):
  # they reuse the sampler the RL stage compiles instead of compiling their own.
  config.eval.update(num_prompts=4, num_samples=4, ks=(1, 2), prompts_per_batch=2,
                     max_new_tokens=24)
  config.log.tensorboard = False
  return config


def base_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields every experiment has."""
  config = ml_collections.ConfigDict()
  config.seed = arg.seed  # seeds parameter init, sampling and data order
  config.workdir = arg.workdir  # checkpoints, metrics.jsonl, eval.jsonl go here
  config.model = model_config(arg.model)  # a preset of corpo_jax/model/config.py, every field
  # Device mesh sizes over axes (data, fsdp, expert, tensor); one may be -1 (all remaining).
  config.mesh = (-1, 1, 1, 1)
  # Multi-slice runs: how many slices (DCN) each mesh axis spans, e.g. (2, 1, 1, 1) for data
  # parallelism over 2 slices; each divides its mesh size (corpo_jax/sharding.py hybrid_devices).
  config.dcn_mesh = (1, 1, 1, 1)
  # A Hugging Face Mixtral directory (config.json, *.safetensors, tokenizer.model) to start from;
  # "" = random init. Its config.json sets model.* architecture fields (corpo_jax/model/pretrained.py).
  config.init_from = ""
  config.new_token_init = "mean"  # rows of tokens added to its vocabulary: "mean" or "zeros"
  # A SentencePiece .model; "" = init_from's tokenizer.model, else the bundled one. <think>,
  # </think> and a pad are appended when it lacks them (corpo_jax/data/tokenizer.py).
  config.tokenizer = ""
  # How a question becomes the prompt: "plain" ("{prompt}\n"), "mistral_instruct"
  # ("[INST] {prompt} [/INST]") or a template with one "{prompt}" (corpo_jax/data/text.py).
  config.prompt_format = "plain"
  config.literal_think_tags = "reject"  # <think>/</think> in user text: "reject" or "escape"
  # Persistent XLA compilation cache (corpo_jax/compile_cache.py): "auto" is
  # $JAX_COMPILATION_CACHE_DIR or ~/.cache/corpo_jax/xla; "" turns it off.
  config.jax_cache_dir = "auto"
  # Named task instances: "kind" is a task of corpo_jax/data/tasks, the rest its options; every
  # task's "weight" is its share of an RL stage's prompts (an exact, seeded mix: data/pipeline.py).
  # `--config.tasks.NEW.path=FILE` declares another user data task NEW (TaskConfigs).
  config.tasks = TaskConfigs({
      "arithmetic": {"kind": "arithmetic", "min_digits": 1, "max_digits": 2, "ops": "+-",
                     "seed": 0, "weight": 1.0},
      "arithmetic3": {"kind": "arithmetic", "min_digits": 3, "max_digits": 3, "ops": "+-",
                      "seed": 0, "weight": 1.0},
      "verify": {"kind": "verify", "max_operand": 99, "seed": 0, "weight": 1.0},
      "jsonl": USER_TASK,  # a user's rows, {"prompt", "answer"} by default
      # Python functions graded by unit tests in a sandbox ("" = the bundled problems); pair it
      # with rewards=(("execution", 1.0),) and e.g. max_new_tokens=128. allow_unsandboxed: run
      # even where the sandbox gets no namespaces; the model's code then sees the host's files
      # (the problems' solutions included) and can write where the sandbox uid may
      # (docs/reliability.md section 1).
      "code": {"kind": "code", "path": "", "eval_fraction": 0.25, "wall_s": 5.0,
               "memory_mb": 512, "allow_unsandboxed": False, "weight": 1.0},
  })
  config.stages = ("rl",)
  config.eval = ml_collections.ConfigDict({
      "tasks": ("arithmetic",),  # evaluated at the end of every stage (and every eval_every)
      "num_prompts": 64,  # held-out problems per task
      "num_samples": 4,  # samples per problem (n of pass@k)
      "ks": (1, 4),  # pass@k reported for these k (each <= num_samples)
      "temperature": 0.8,  # 0: greedy
      "max_new_tokens": 64,
      "stop": (),  # strings that end a completion; its text is cut after the first
      "prompts_per_batch": 16,
  })
  config.checkpoint = ml_collections.ConfigDict({"max_to_keep": 2, "async_save": True})
  config.log = ml_collections.ConfigDict({
      "tensorboard": True,  # event files in workdir/tensorboard/ (tensorboard --logdir workdir)
      "progress": True,  # the one-line progress display on stderr
      # Also log to Weights & Biases (pip install wandb); a rerun resumes it (workdir/wandb_id).
      "wandb": False,
      "wandb_project": "corpo_jax",
      "wandb_name": "",  # "" = the workdir's name
  })
  return config
