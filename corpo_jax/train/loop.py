"""Runs `config.stages` in order, each resumable from its own checkpoints.

Each stage keeps its checkpoints in `<workdir>/checkpoints/<stage>`; its last checkpoint is
marked done. A rerun of the same command skips finished stages (taking their final parameters),
resumes an unfinished one from its latest checkpoint (state, data iterator, step) and starts the
rest. A stage starts from the previous stage's final parameters (the first from the seeded
initialisation); an RL stage's reference policy is its starting point.

Multi-process runs follow corpo_jax/distributed.py: each process loads its rows of every global
batch, every process scores all completions, process 0 alone logs, all processes checkpoint.

Randomness: step k of stage s uses fold_in(fold_in(key(seed), s), k), so a resumed run draws
the same samples as an uninterrupted one. Metrics rows of steps after the restored checkpoint
are dropped from metrics.jsonl on resume, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import compile_cache, distributed, evaluate, model, sampling, sharding
from corpo_jax.data import pipeline
from corpo_jax.data import text as text_lib
from corpo_jax.data import tasks as tasks_lib
from corpo_jax.data.tokenizer import Tokenizer, bundled
from corpo_jax.model import ModelConfig, pretrained
from corpo_jax.model.config import TOKENIZER_FIELDS
from corpo_jax.rl import rewards as rewards_lib
from corpo_jax.rl import rollout as rollout_lib
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import RLConfig
from corpo_jax.rl.reference import reference_policy
from corpo_jax.train import checkpoint, memory, optim
from corpo_jax.train import state as state_lib
from corpo_jax.train import workdir as workdir_lib
from corpo_jax.train import sft as sft_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import MetricsWriter, OneStepLate, Progress

STAGE_KINDS = ("sft", "rl")
# "train": the rollout uses the trainer's parameters as they are laid out; "decode": a copy in the
# compute dtype on the sampler's view of the devices (model.for_decoding), made every step.
ROLLOUT_LAYOUTS = ("train", "decode")


class Preempted(Exception):
  """Raised after the preemption checkpoint is on disk; main exits 0."""


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


# ----------------------------------------------------------------------------- setup


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


def _write_atomically(path: str, text: str) -> None:
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
      _write_atomically(os.path.join(config.workdir, "config.json"),
                        config.to_json_best_effort(indent=2))
    except OSError as e:
      raise ValueError(f"Cannot write to --config.workdir={config.workdir!r} ({e}); choose a "
                       f"writable directory with free space.") from e
  writer = MetricsWriter.from_config(config, enabled=is_main)
  return Run(config, cfg, mesh, tokenizer, writer, is_main)


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass
class StagePlan:
  """What differs between stage kinds."""

  optimizer: Any
  loader: Any
  # (state, the loader's iterator, k) -> (state, metrics, host metrics); the step takes the
  # batches it needs from the iterator (an RL step with dynamic sampling may take several).
  step: Callable[[Any, Any, int], tuple[Any, Any, dict]]
  progress_keys: tuple[str, ...]
  tasks: list


def _global_batch(run: Run, batch: dict, rows_sharding: Any, num_rows: int, left: bool) -> dict:
  """This process's rows of a loader batch as global arrays, padded to the widest process's
  width (corpo_jax/distributed.py)."""
  width = distributed.max_over_processes(batch["tokens"].shape[1])
  batch = pipeline.pad_to(batch, width, run.tokenizer.pad_id, left)
  return distributed.to_global(batch, rows_sharding, num_rows)


def _sft_plan(run: Run, name: str, stage, index: int) -> StagePlan:
  opt_cfg, optimizer = stage_optimizer(run, name)
  update = sft_lib.make_sft_update(run.cfg, opt_cfg, optimizer, run.mesh,
                                   loss_on=stage.loss_on, step_loss_weight=stage.step_loss_weight)
  tasks = [run.task(t) for t in stage.tasks]
  if stage.traces:
    rows = pipeline.read_traces(stage.traces)
  else:
    rows = pipeline.TaskTraces(tasks[0]) if len(tasks) == 1 else None
    if rows is None:
      raise ValueError(f"config.{name}.tasks={tuple(stage.tasks)}: SFT on generated traces takes "
                       f"one task (or set config.{name}.traces).")
  rows_sh = NamedSharding(run.mesh, P(sharding.BATCH_AXES))  # the update's batch sharding
  loader = pipeline.sft_sequences(rows, run.tokenizer, batch_size=stage.batch_size,
                                  seed=run.config.seed + index, trace_share=stage.trace_share,
                                  batch_rows=distributed.process_rows(rows_sh, stage.batch_size))

  def step(state, batches, k):
    del k
    batch = _global_batch(run, next(batches), rows_sh, stage.batch_size, left=False)
    state, metrics = update(state, sft_lib.SftBatch.from_numpy(batch))
    return state, metrics, {"tokens": int(batch["token_mask"].sum()),
                            "data/think_tags_escaped": int(batch["think_tags"].sum())}

  return StagePlan(optimizer, loader, step, ("loss", "nll"), tasks)


def _rl_plan(run: Run, name: str, stage, index: int, start: Callable[[], Any]) -> StagePlan:
  rl_cfg, optimizer = stage_optimizer(run, name)
  update = rl_step.make_update(run.cfg, rl_cfg, run.mesh, optimizer)
  tasks = [run.task(t) for t in stage.tasks]
  B = stage.prompts_per_step
  prompt_sh = sharding.batch_sharding(run.mesh, (B,))
  loader = pipeline.rl_prompts(tasks, run.tokenizer, batch_size=B, seed=run.config.seed + index,
                               max_prompt_len=stage.max_prompt_len,
                               long_prompts=stage.long_prompts,
                               batch_rows=distributed.process_rows(prompt_sh, B))
  stage_rng = jax.random.fold_in(jax.random.key(run.config.seed), index)
  spec, G, tok = rewards_lib.check_spec(stage.rewards), stage.group_size, run.tokenizer
  max_think = stage.max_thinking_tokens or None
  decode_layout = stage.get("rollout_layout", "train") == "decode"

  @functools.cache
  def reference():
    """The frozen reference policy, made at the stage's first step (after its state)."""
    if rl_cfg.beta == 0:
      return None
    ref = reference_policy(start(), rl_cfg.reference_dtype)
    if rl_cfg.reference_dtype != "param" and isinstance(start, StartParams):
      start.release()  # a cast copy: nothing in this stage needs the originals again
    return ref

  rounds = rl_cfg.dynamic_sampling_max_batches if rl_cfg.dynamic_sampling else 1

  def step(state, batches, k):
    t0 = time.perf_counter()
    policy, cfg, mesh = state.params, run.cfg, run.mesh
    if decode_layout:  # the sampler's copy, made once per step
      policy, cfg, mesh = model.for_decoding(state.params, run.cfg, run.mesh)
    rng = jax.random.fold_in(stage_rng, k)

    def draw(t):  # the step's t-th prompt batch (t > 0: dynamic sampling's refills)
      return rollout_lib.sample_groups(
          policy, cfg, mesh, _global_batch(run, next(batches), prompt_sh, B, left=True),
          rng=rng if t == 0 else jax.random.fold_in(rng, t), group_size=G, tokenizer=tok,
          tasks=tasks, spec=spec,
          put_rows=(lambda r: _rows_on(r, run.mesh)) if decode_layout else (lambda r: r),
          stop=tuple(stage.get("stop", ())), max_new_tokens=stage.max_new_tokens,
          strategy=sampling.strategy(stage.temperature, stage.top_k, stage.top_p),
          eos_id=tok.eos_id, max_thinking_tokens=max_think)

    groups, dynamic = rollout_lib.collect(draw, B, rounds, tok.pad_id)
    policy = None  # the decode layout's copy is freed before the update
    t_rollout = time.perf_counter() - t0
    batch = rl_step.make_batch(groups.prompt_tokens, groups.prompt_mask, groups.rollout,
                               groups.rewards)
    state, metrics = update(state, batch, reference())
    host = rollout_lib.host_metrics(groups)
    host["time/rollout_s"] = t_rollout
    if rl_cfg.dynamic_sampling:
      host.update(dynamic)
    return state, metrics, host

  return StagePlan(optimizer, loader, step, ("loss", "reward/mean", "adv/frac_failed_positive"),
                   tasks)


def _rows_on(rollout: sampling.Rollout, mesh: jax.sharding.Mesh) -> sampling.Rollout:
  """A rollout made on the sampler's view of the devices, with its rows laid out for `mesh`."""
  def put(path, x):
    rows_at = 1 if path[-1].name == "experts" else 0  # experts are [L, rows, T, A]
    names = (None,) * rows_at + ("batch",) + (None,) * (x.ndim - rows_at - 1)
    return jax.device_put(x, sharding.named_sharding(mesh, names, x.shape))
  return jax.tree_util.tree_map_with_path(put, rollout)


# fold_in tag of the evaluation rng: apart from the stages' streams, fold_in(key(seed), index).
EVAL_STREAM = 0x5EED_E7A1


def eval_rng(config: ml_collections.ConfigDict) -> jax.Array:
  """The sampling rng of every evaluation of a run (each stage, each step, the eval CLI): the
  prompts are fixed too, so two evaluations differ only by the policy (common random numbers),
  and `python -m corpo_jax.evaluate` reproduces the last in-training evaluation."""
  return jax.random.fold_in(jax.random.key(config.seed), EVAL_STREAM)


def _evaluate(run: Run, params: Any, stage_name: str, step: int, rng: jax.Array,
              out: str | None = None) -> list[dict]:
  """Evaluates `params` on config.eval's tasks; rows appended to `out` (default: eval.jsonl)."""
  ev = run.config.eval
  strategy = sampling.strategy(ev.temperature)
  stop = tuple(ev.get("stop", ()))  # older configs lack it
  calls = itertools.count()

  def generate_fn(prompts, mask, n):
    with jax.set_mesh(run.mesh):
      rollout = sampling.generate(params, run.cfg, prompts, mask,
                                  rng=jax.random.fold_in(rng, next(calls)), num_samples=n,
                                  max_new_tokens=ev.max_new_tokens, strategy=strategy,
                                  eos_id=run.tokenizer.eos_id)
    tokens, m = distributed.fetch((rollout.tokens, rollout.mask))
    return [text_lib.cut_at_stop(run.tokenizer.decode(t[k]), stop) for t, k in zip(tokens, m)]

  rows = []
  for name in ev.tasks:
    result = evaluate.evaluate_task(generate_fn, run.tokenizer, run.task(name),
                                    num_prompts=ev.num_prompts, num_samples=ev.num_samples,
                                    ks=ev.ks, prompts_per_batch=ev.prompts_per_batch)
    rows.append({"step": step, "stage": stage_name, "task": name, **result})
  if run.is_main:
    with open(out or run.path("eval.jsonl"), "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  if out is None:  # the run's own evaluations also go to TensorBoard / W&B
    run.writer.log_eval(step, stage_name, rows)
  for row in rows:
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in row["pass_at_k"].items())
    run.say(f"eval after {stage_name} step {step}, {row['task']}: accuracy "
            f"{row['accuracy']:.3f}, {ks}, transparency {row['transparency']:.2f}")
  return rows


def _drop_rows_after(path: str, stage: str, step: int) -> None:
  """Removes the rows of `stage` with step > `step` (written after the checkpoint the stage
  resumes from) and any line torn by a kill. Atomic: a kill while rewriting keeps the old file."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not (row["stage"] == stage and row["step"] > step):
        keep.append(json.dumps(row) + "\n")
  _write_atomically(path, "".join(keep))


def _stop(name: str, ckpt: Checkpointer, what: str) -> None:
  """Stops a diverged stage after pending saves are on disk, naming its last good checkpoint
  (every checkpoint is finite: Checkpointer.save), which a rerun resumes from."""
  ckpt.wait()
  last = ckpt.latest_step()
  ckpt.close()
  kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
          else "no checkpoint of this stage was written yet")
  raise ValueError(f"stage {name}: {what}; {kept}. Lower config.{name}.learning_rate (or check "
                   f"the data and rewards), then rerun to resume from it.")


def _stop_diverged(name: str, stage, ckpt: Checkpointer, k: int, skipped: int) -> None:
  """Raises once too many steps were skipped; the stage's latest checkpoint predates them."""
  _stop(name, ckpt, f"{skipped} optimizer steps up to step {k} had a non-finite loss or "
        f"gradient and were skipped, more than config.{name}.max_skipped_steps="
        f"{stage.max_skipped_steps}")


def run_stage(run: Run, index: int, name: str,
              start: Callable[[], Any]) -> tuple[Any, list[dict]]:
  """Runs (or resumes, or skips if done) one stage from the params `start()` gives; returns its
  final params and eval rows. SIGTERM ends the process at once until the stage's first step has
  run (setting up, initialising and compiling leave nothing to save), then asks for a
  checkpoint (corpo_jax/train/checkpoint.py)."""
  with contextlib.ExitStack() as nothing_to_save:
    nothing_to_save.enter_context(checkpoint.terminate_on_sigterm())

    def can_save():
      nothing_to_save.close()
      checkpoint.install_sigterm_handler()

    return _run_stage(run, index, name, start, can_save)


def _run_stage(run: Run, index: int, name: str, start: Callable[[], Any],
               can_save: Callable[[], None]) -> tuple[Any, list[dict]]:
  stage = run.config[name]
  ckpt = Checkpointer(run.path("checkpoints", name), max_to_keep=run.config.checkpoint.max_to_keep,
                      async_save=run.config.checkpoint.async_save)
  plan = (_sft_plan(run, name, stage, index) if stage.kind == "sft"
          else _rl_plan(run, name, stage, index, start))
  iterator = iter(plan.loader)
  latest = None
  if ckpt.all_steps():  # the newest intact step; damaged newer ones are reported and set aside
    latest, state, meta = ckpt.restore_latest(
        state_lib.abstract_state(run.cfg, plan.optimizer, run.mesh), iterator, set_aside=True,
        report=lambda message: run.say(f"stage {name}: {message}"))
    if meta.get("done"):
      run.say(f"stage {name}: already finished (step {latest}); skipping")
      ckpt.close()
      return state.params, []
    run.say(f"stage {name}: resuming from the checkpoint at step {latest}")
  else:
    state = state_lib.init_state(run.cfg, plan.optimizer, start(), run.mesh)
  if run.is_main:  # rows an interrupted attempt wrote after its last complete checkpoint
    for log in (run.writer.path, run.path("eval.jsonl"), run.path("samples.jsonl")):
      _drop_rows_after(log, name, latest or 0)

  rng = eval_rng(run.config)
  progress = Progress(name, stage.steps, plan.progress_keys,
                      enabled=run.is_main and run.config.log.progress, start_step=int(state.step))
  late, t_last = OneStepLate(), time.perf_counter()
  samples_every = stage.get("samples_every", 0)

  def emit(item):
    if item is None:
      return
    k, host = item
    samples = host.pop("samples", None)
    if samples and samples_every and k % samples_every == 0:
      run.writer.write_samples(k, name, samples)
    run.writer.write(k, name, host)
    progress.update(k, host)
    if host.get("skipped", 0) > stage.max_skipped_steps:
      _stop_diverged(name, stage, ckpt, k, host["skipped"])

  saved = {latest}

  def save(k: int, done: bool):
    emit(late.flush())  # rows up to k are on disk before the checkpoint that covers them
    if k not in saved:  # a preemption right after a periodic save has nothing new to save
      try:
        ckpt.save(k, state, {"stage": name, "step": k, "done": done}, iterator)
      except checkpoint.NonFiniteState as e:
        _stop(name, ckpt, f"after step {k} the train state holds {e}; it was not saved and the "
              f"stage is not marked done")
      saved.add(k)

  eval_rows, first = [], int(state.step)
  for k in range(first, stage.steps):
    if ckpt.preempted(k):
      save(k, done=False)
      ckpt.close()
      raise Preempted(f"stage {name} preempted at step {k}; checkpoint saved")
    state, metrics, host = plan.step(state, iterator, k)
    if k == first:
      can_save()
    now = time.perf_counter()
    host.update({"time/step_s": now - t_last, "tokens_per_s": host["tokens"] / (now - t_last)})
    t_last = now
    emit(late.push(k + 1, metrics, host))
    if (k + 1) % stage.checkpoint_every == 0 and k + 1 < stage.steps:
      save(k + 1, done=False)
    if stage.eval_every and (k + 1) % stage.eval_every == 0 and k + 1 < stage.steps:
      _evaluate(run, state.params, name, k + 1, rng)
  emit(late.flush())
  progress.close()
  eval_rows = _evaluate(run, state.params, name, stage.steps, rng)
  save(stage.steps, done=True)
  ckpt.close()
  return state.params, eval_rows


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


@contextlib.contextmanager
def _disk_full_is_an_error(workdir: str):
  """A full disk (metrics, samples, evaluation rows, config.json; checkpoints say it
  themselves) is the user's ValueError naming the file, not a traceback."""
  try:
    yield
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    raise ValueError(f"Writing {e.filename or 'a file'} failed: [Errno {e.errno}] {e.strerror}. "
                     f"The complete checkpoints under {os.path.abspath(workdir)}/checkpoints are "
                     f"intact; free disk space, then rerun the same command to resume from "
                     f"the latest.") from e


def run(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  """Runs every stage; returns each stage's final evaluation rows."""
  with _disk_full_is_an_error(config.workdir):
    return _run(config)


def _run(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  r = setup(config)
  start = initial_params(r)
  source = "random init"
  if config.get("init_from"):
    added = r.tokenizer.added_pieces
    source = f"from {config.init_from}" + (f", vocabulary + {', '.join(added)}" if added else "")
  r.say(f"model {model.count_params(model.abstract_params(r.cfg)) / 1e6:.2f}M parameters "
        f"({source}) on mesh {dict(r.mesh.shape)} ({jax.device_count()} "
        f"{jax.default_backend()} devices); stages {tuple(config.stages)}; workdir "
        f"{os.path.abspath(config.workdir)}")
  check_memory(r)
  results = {}
  for index, name in enumerate(config.stages):
    params, results[name] = run_stage(r, index, name, start)
    start = StartParams(lambda params=params: params)
    del params  # `start` owns them (StartParams.release)
  r.writer.close()
  return results


def restore_workdir(workdir: str, stage: str | None = None) -> tuple[Run, str, int, Any]:
  """(the run set up from a workdir's saved config.json, stage, step, params) of that stage's
  newest intact checkpoint (default: the newest of the last stage that has one); damaged newer
  ones are reported and left where they are."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"No config.json in {workdir!r}: is it the --config.workdir of a run?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.workdir = workdir
  if stage is not None and stage not in config.stages:
    raise ValueError(f"--stage={stage!r} is not a stage of this run; its stages are "
                     f"{tuple(config.stages)}.")
  r = setup(config)
  for name in [stage] if stage else reversed(config.stages):
    directory = r.path("checkpoints", name)
    if not os.path.isdir(directory):
      continue
    ckpt = Checkpointer(directory)
    try:
      if not ckpt.all_steps():
        continue
      _, optimizer = stage_optimizer(r, name)
      latest, state, _ = ckpt.restore_latest(state_lib.abstract_state(r.cfg, optimizer, r.mesh),
                                             set_aside=False, report=r.say)
    finally:
      ckpt.close()
    return r, name, latest, state.params
  where = f"{workdir}/checkpoints/{stage}" if stage else f"{workdir}/checkpoints"
  raise ValueError(f"No checkpoint under {where}; nothing to restore.")


def evaluate_workdir(workdir: str, stage: str | None = None, num_prompts: int | None = None,
                     out: str | None = None) -> list[dict]:
  """Evaluates a run's checkpoint (`restore_workdir`) with its saved config.json's eval settings
  and the run's eval rng (so it is paired with the in-training evaluations); rows appended to
  `out` (default: <workdir>/eval.jsonl). num_prompts: evaluate on this many problems instead of
  config.eval.num_prompts (the first problems are the same ones).
  """
  if num_prompts is not None and num_prompts < 1:
    raise ValueError(f"--num_prompts={num_prompts}: evaluate at least one problem.")
  with _disk_full_is_an_error(workdir):
    r, name, step, params = restore_workdir(workdir, stage)
    if num_prompts is not None:
      r.config.eval.num_prompts = num_prompts  # after setup: the saved config.json is unchanged
    return _evaluate(r, params, name, step, eval_rng(r.config), out)
