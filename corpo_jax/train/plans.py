"""What one step of each stage kind does: `sft_plan` and `rl_plan` build a `StagePlan` (the
optimizer, the data loader, and the step function the stage runner in corpo_jax/train/loop.py
calls once per step). An RL step samples its groups (corpo_jax/rl/rollout.py), scores them and
runs the update (corpo_jax/rl/step.py)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import distributed, model, sampling, sharding
from corpo_jax.data import pipeline
from corpo_jax.rl import rewards as rewards_lib
from corpo_jax.rl import rollout as rollout_lib
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.reference import reference_policy
from corpo_jax.train import sft as sft_lib
from corpo_jax.train.setup import Run, StartParams, stage_optimizer


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


def sft_plan(run: Run, name: str, stage, index: int) -> StagePlan:
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


def rl_plan(run: Run, name: str, stage, index: int, start: Callable[[], Any]) -> StagePlan:
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
