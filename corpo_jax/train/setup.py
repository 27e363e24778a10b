"""A run's setup, before any stage starts: the config checks (stage fields, tasks, rewards, the
batch layout against the mesh), the tokenizer, the model config (from the checkpoint being
fine-tuned, if any), the initial parameters, the workdir's model check, the memory check, and
the `Run` every stage shares (corpo_jax/train/loop.py runs the stages)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from corpo_jax import compile_cache, model, sharding
from corpo_jax.data import pipeline
from corpo_jax.data import tasks as tasks_lib
from corpo_jax.data.tokenizer import Tokenizer, bundled
from corpo_jax.model import ModelConfig, pretrained
from corpo_jax.model.config import TOKENIZER_FIELDS
from corpo_jax.rl import rewards as rewards_lib
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import RLConfig
from corpo_jax.rl.reference import reference_policy
from corpo_jax.train import memory, optim
from corpo_jax.train import state as state_lib
from corpo_jax.train import workdir as workdir_lib
from corpo_jax.train import sft as sft_lib
from corpo_jax.train.metrics import MetricsWriter

STAGE_KINDS = ("sft", "rl")
# "train": the rollout uses the trainer's parameters as they are laid out; "decode": a copy in the
# compute dtype on the sampler's view of the devices (model.for_decoding), made every step.
ROLLOUT_LAYOUTS = ("train", "decode")


@dataclasses.dataclass
class Run:
  """Everything the stages share."""

  config: ml_collections.ConfigDict
  cfg: ModelConfig
  mesh: jax.sharding.Mesh
  tokenizer: Tokenizer
  writer: MetricsWriter
  is_main: bool

  def task(self, name: str):
    if name not in self.config.tasks:
      raise ValueError(f"Unknown task {name!r}; configured tasks: {sorted(self.config.tasks)}.")
    options = dict(self.config.tasks[name])
    kind = options.pop("kind")
    if kind == "jsonl" and not options.get("path"):
      raise ValueError(f"Task {name!r} needs --config.tasks.{name}.path=<a .jsonl or .parquet "
                       f"file of {{\"prompt\", \"answer\"}} rows, or hf:NAME[:CONFIG]:SPLIT> "
                       f"(docs/data.md).")
    return tasks_lib.get(kind, **options)

  def path(self, *parts: str) -> str:
    return os.path.join(self.config.workdir, *parts)

  def say(self, message: str) -> None:
    """A line for the person running the job (process 0 only; logs stay at WARNING)."""
    if self.is_main:
      print(f"corpo_jax: {message}", file=sys.stderr, flush=True)



# Numeric stage fields the loop reads, each with its lowest valid value (and what that value
# means); RLConfig checks its own fields.
_AT_LEAST = {
    "sft": (("batch_size", 1, "sequences per step"), ("checkpoint_every", 1, "steps between "
            "checkpoints"), ("eval_every", 0, "0 evaluates at the end only"),
            ("step_loss_weight", 0, "0 turns the step-type loss off")),
    "rl": (("prompts_per_step", 1, "prompts per step"), ("max_new_tokens", 1, "tokens per "
           "completion"), ("checkpoint_every", 1, "steps between checkpoints"),
           ("eval_every", 0, "0 evaluates at the end only"), ("samples_every", 0, "0 logs none"),
           ("temperature", 0, "0 is greedy"), ("top_k", 0, "0 is off"),
           ("max_thinking_tokens", 0, "0 is no budget"),
           ("max_prompt_len", 2, "<bos> and one token")),
}
_EVAL_AT_LEAST = (("num_prompts", 1, "problems per task"), ("num_samples", 1, "samples per "
                  "problem"), ("prompts_per_batch", 1, "problems per generate call"),
                  ("max_new_tokens", 1, "tokens per completion"), ("temperature", 0, "0 is greedy"))


def _check_finite(value: Any, where: str) -> None:
  """Every float anywhere in the config (learning rates, temperatures, tau, beta, reward weights,
  task options) is finite: NaN passes every range check."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    for key, v in value.items():
      _check_finite(v, f"{where}.{key}")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_finite(v, f"{where}[{i}]")
  elif isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"{where}={value} is not a finite number; give it a finite value.")


def _check_at_least(section: Any, where: str, fields: tuple) -> None:
  for field, low, meaning in fields:
    if field in section and section[field] < low:
      raise ValueError(f"{where}.{field}={section[field]} must be >= {low} ({meaning}).")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the field, on values out of range and options that cannot work
  together."""
  if not config.stages:
    raise ValueError("config.stages is empty; e.g. --config.stages='(\"sft\", \"rl\")'.")
  _check_finite(config, "config")
  for name in config.stages:
    if name not in config or not isinstance(config[name], ml_collections.ConfigDict):
      raise ValueError(f"config.stages names {name!r} but there is no config.{name} stage "
                       f"sub-config.")
    stage = config[name]
    if stage.kind not in STAGE_KINDS:
      raise ValueError(f"config.{name}.kind={stage.kind!r} is not one of {STAGE_KINDS}.")
    if stage.steps < 1:
      raise ValueError(f"config.{name}.steps={stage.steps} must be >= 1.")
    if stage.max_skipped_steps < 0:
      raise ValueError(f"config.{name}.max_skipped_steps={stage.max_skipped_steps} must be >= 0.")
    _check_at_least(stage, f"config.{name}", _AT_LEAST[stage.kind])
    if stage.kind == "rl" and not 0 < stage.top_p <= 1:
      raise ValueError(f"config.{name}.top_p={stage.top_p} must be in (0, 1] (1.0 is off).")
    if stage.kind == "sft" and not 0 <= stage.trace_share <= 1:
      raise ValueError(f"config.{name}.trace_share={stage.trace_share} must be in [0, 1] (the "
                       f"share of rows trained with their trace).")
    if stage.kind == "rl":
      if stage.group_size < 2:
        raise ValueError(f"config.{name}.group_size={stage.group_size}: group-relative "
                         f"advantages need at least 2 completions per prompt.")
      _check_task_rewards(config, name)
      if stage.get("rollout_layout", "train") not in ROLLOUT_LAYOUTS:
        raise ValueError(f"config.{name}.rollout_layout={stage.rollout_layout!r} is not one of "
                         f"{ROLLOUT_LAYOUTS}.")
      if stage.long_prompts not in pipeline.LONG_PROMPTS:
        raise ValueError(f"config.{name}.long_prompts={stage.long_prompts!r} is not one of "
                         f"{pipeline.LONG_PROMPTS}.")
    else:
      sft_lib.check_loss_on(stage.loss_on)
    rl_config(config, name)  # validates the RL / optimizer fields
  if config.get("new_token_init", "mean") not in pretrained.NEW_TOKEN_INITS:
    raise ValueError(f"config.new_token_init={config.new_token_init!r} is not one of "
                     f"{pretrained.NEW_TOKEN_INITS}.")
  _check_at_least(config.eval, "config.eval", _EVAL_AT_LEAST)
  if config.checkpoint.max_to_keep < 1:
    raise ValueError(f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1 "
                     f"(the checkpoints kept per stage; the newest is what a rerun resumes from).")
  for k in config.eval.ks:
    if not 1 <= k <= config.eval.num_samples:
      raise ValueError(f"config.eval.ks contains {k}; each k must be in [1, "
                       f"config.eval.num_samples={config.eval.num_samples}].")


def _check_task_rewards(config: ml_collections.ConfigDict, name: str) -> None:
  """Rewards defined for some task kinds only (e.g. execution: code) get only those tasks."""
  stage = config[name]
  for reward, _ in rewards_lib.check_spec(stage.rewards):
    kinds = rewards_lib.TASK_REWARDS.get(reward)
    for task in stage.tasks if kinds else ():
      kind = config.tasks[task].kind if task in config.tasks else None
      if kind not in kinds:
        raise ValueError(f"config.{name}.rewards uses {reward!r}, defined for tasks of kind "
                         f"{kinds} only, but config.{name}.tasks has {task!r} (kind {kind!r}).")


_RL_FIELDS = tuple(f.name for f in dataclasses.fields(RLConfig))


def rl_config(config: ml_collections.ConfigDict, name: str) -> RLConfig:
  """A stage's RLConfig: its RLConfig fields (an SFT stage has the optimizer ones only) plus,
  for an RL stage, the ones derived from its sampling settings."""
  stage = config[name]
  fields = {k: stage[k] for k in _RL_FIELDS if k in stage}
  if stage.kind == "rl":
    fields.update(temperature=stage.temperature or 1.0, max_completion_len=stage.max_new_tokens)
  try:
    return RLConfig.from_dict(fields)
  except ValueError as e:
    raise _for_stage(e, name) from None


def _for_stage(error: ValueError, name: str) -> ValueError:
  """An RLConfig / rl.step error with its rl.* field names as the stage's config.<name>.* ones."""
  return ValueError(str(error).replace("rl.", f"config.{name}.").replace(
      "B*G", f"config.{name}.prompts_per_step * group_size"))


def stage_optimizer(run: Run, name: str) -> tuple[RLConfig, Any]:
  """(RLConfig, optax optimizer) of a stage; the same for training and for restoring it, and the
  same object for stages of one program config (optim.program_optimizer)."""
  rl_cfg = rl_config(run.config, name)
  return rl_cfg, optim.program_optimizer(run.cfg, rl_cfg)


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """config.tokenizer, else config.init_from's tokenizer.model, else the bundled one, with the
  run's prompt format and think-tag policy."""
  options = dict(prompt_format=config.get("prompt_format", "plain"),  # old configs lack them
                 literal_think_tags=config.get("literal_think_tags", "reject"))
  path = config.tokenizer
  if config.get("init_from") and not os.path.isdir(config.init_from):
    raise ValueError(f"--config.init_from={config.init_from!r} is not a directory; pass a Hugging "
                     f"Face Mixtral directory (config.json, *.safetensors, tokenizer.model).")
  if not path and config.get("init_from"):
    path = os.path.join(config.init_from, "tokenizer.model")
    if not os.path.isfile(path):
      raise ValueError(f"--config.init_from={config.init_from!r} has no tokenizer.model; pass the "
                       f"checkpoint's SentencePiece model with --config.tokenizer=PATH.")
  return Tokenizer.load(path, **options) if path else bundled(**options)


def model_config(config: ml_collections.ConfigDict, tok: Tokenizer) -> ModelConfig:
  """The run's ModelConfig: config.model, with the architecture of config.init_from's checkpoint
  (corpo_jax/model/pretrained.py) and the tokenizer's special ids; the vocabulary grows by the
  pieces the tokenizer added to a pretrained one."""
  fields = dict(config.model)
  for field in TOKENIZER_FIELDS:  # set by the tokenizer; an old or hand-written config has them
    if field in fields and fields.pop(field) != getattr(tok, field):
      raise ValueError(f"config.model.{field}={config.model[field]} but the tokenizer's id is "
                       f"{getattr(tok, field)}; remove config.model.{field} (the trainer takes "
                       f"it from the tokenizer).")
  if config.get("init_from"):
    fixed = pretrained.checkpoint_fields(config.init_from)
    if tok.base_vocab_size > fixed["vocab_size"]:
      raise ValueError(f"The tokenizer {tok.name} has {tok.base_vocab_size} pieces but the "
                       f"checkpoint {config.init_from} has {fixed['vocab_size']} embedding "
                       f"rows; use the checkpoint's own tokenizer.model.")
    for field in set(TOKENIZER_FIELDS) & set(fixed):  # a saved thinking head's ids
      if fixed.pop(field) != getattr(tok, field):
        raise ValueError(f"The thinking head in {config.init_from} was trained with another "
                         f"{field} than the tokenizer {tok.name}'s {getattr(tok, field)}; use the "
                         f"tokenizer.model saved with it.")
    fields.update(fixed, vocab_size=max(fixed["vocab_size"], tok.vocab_size))
  cfg = ModelConfig.from_dict({**fields, **{f: getattr(tok, f) for f in TOKENIZER_FIELDS}})
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"The tokenizer has {tok.vocab_size} tokens but model.vocab_size="
                     f"{cfg.vocab_size}; set --config.model.vocab_size={tok.vocab_size} or more.")
  return cfg


class StartParams:
  """The params a stage starts from, made when first called for (a rerun whose stage has a
  checkpoint may never need them) and kept until `release()`: the stage's train state holds a
  copy, and its reference policy is these arrays unless it is a cast copy (rl/reference.py),
  after which the stage releases them so that they can be freed."""

  def __init__(self, make: Callable[[], Any]):
    self._make, self._params = make, None

  def __call__(self) -> Any:
    if self._params is None:
      if self._make is None:
        raise RuntimeError("StartParams: called after release().")
      self._params = self._make()
    return self._params

  def release(self) -> None:
    self._make = self._params = None


def initial_params(run: Run) -> StartParams:
  """The first stage's starting params (config.init_from's checkpoint, else the seeded random
  init)."""
  rng = jax.random.key(run.config.seed)
  if not run.config.get("init_from"):
    return StartParams(lambda: model.init_params(run.cfg, rng, run.mesh))
  tok = run.tokenizer
  return StartParams(lambda: pretrained.load(
      run.config.init_from, run.cfg, run.mesh, rng=rng,
      new_token_ids=range(tok.base_vocab_size, tok.vocab_size), existing_rows=tok.base_vocab_size,
      new_token_init=run.config.get("new_token_init", "mean")))


def check_workdir_model(workdir: str, cfg: ModelConfig) -> None:
  """Refuses a workdir whose checkpoints hold parameters of other shapes (its config.json's
  model), naming the model fields that differ; runs before config.json is overwritten."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    saved = json.load(f)["model"]
  now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, like the saved file
  if saved == now:
    return
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(model.abstract_params(c)))
  if shapes(ModelConfig.from_dict(saved)) != shapes(cfg):
    diff = ", ".join(f"model.{k}={v!r} (this run: {now.get(k)!r})" for k, v in saved.items()
                     if now.get(k) != v)
    raise ValueError(f"The checkpoints in {workdir} are of a model with {diff}; they cannot be "
                     f"restored into this run's model. Rerun with those model fields or use a "
                     f"fresh --config.workdir.")


def check_batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Fails at start, naming the stage's fields, when an RL stage's batch cannot split into its
  micro-batches and over the mesh (rl_step.check_layout; the update would fail at its first
  step, after the earlier stages had run)."""
  for name in config.stages:
    stage = config[name]
    if stage.kind != "rl":
      continue
    try:  # prompt_len 1: the trainer's batches always carry their prompts' width
      rl_step.check_layout(rl_config(config, name), stage.prompts_per_step, stage.group_size, 1,
                           mesh)
    except ValueError as e:
      raise _for_stage(e, name) from None


def write_atomically(path: str, text: str) -> None:
  """Writes path.tmp, then renames it over path: a failed write (a full disk) keeps the old
  file and leaves no temporary file."""
  try:
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(path + ".tmp")
    raise


def setup(config: ml_collections.ConfigDict) -> Run:
  check_config(config)
  # One run per workdir (train/workdir.py), before anything in it is written.
  workdir_lib.lock(config.workdir, lambda m: print(f"corpo_jax: {m}", file=sys.stderr))
  compile_cache.use(config.get("jax_cache_dir", "auto"))  # old workdirs' configs lack it
  mesh = sharding.make_mesh(config.mesh, dcn=config.get("dcn_mesh"))  # older configs lack it
  check_batch_layout(config, mesh)
  tokenizer = load_tokenizer(config)
  cfg = model_config(config, tokenizer)
  is_main = jax.process_index() == 0
  check_workdir_model(config.workdir, cfg)
  # The saved config.json shows the model the run has (a checkpoint's architecture, the vocabulary).
  config.model.update({k: v for k, v in cfg.to_dict().items() if k in config.model})
  if is_main:
    try:
      os.makedirs(config.workdir, exist_ok=True)
      write_atomically(os.path.join(config.workdir, "config.json"),
                        config.to_json_best_effort(indent=2))
    except OSError as e:
      raise ValueError(f"Cannot write to --config.workdir={config.workdir!r} ({e}); choose a "
                       f"writable directory with free space.") from e
  writer = MetricsWriter.from_config(config, enabled=is_main)
  return Run(config, cfg, mesh, tokenizer, writer, is_main)



def check_memory(run: Run) -> None:
  """Prints the per-device memory of the stage that holds the most (its train state, and its
  reference policy when it has one) and refuses a run that cannot fit, from shapes alone
  (corpo_jax/train/memory.py)."""
  estimates = []
  for name in run.config.stages:
    rl_cfg, optimizer = stage_optimizer(run, name)
    state = state_lib.abstract_state(run.cfg, optimizer, run.mesh)
    has_ref = run.config[name].kind == "rl" and rl_cfg.beta > 0
    ref = reference_policy(state.params, rl_cfg.reference_dtype) if has_ref else None
    estimates.append(memory.estimate(state, ref))
  est = max(estimates, key=lambda e: e.total)
  run.say(memory.describe(est))
  memory.check_fits(est)
