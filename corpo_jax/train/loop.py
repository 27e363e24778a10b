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

The run's setup (config checks, tokenizer, model, initial parameters) is corpo_jax/train/setup.py;
what one step of each stage kind does is corpo_jax/train/plans.py.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from corpo_jax import distributed, evaluate, model, sampling
from corpo_jax.data import text as text_lib
from corpo_jax.train import checkpoint, plans, preemption
from corpo_jax.train import state as state_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.train.metrics import OneStepLate, Progress
from corpo_jax.train.setup import (Run, StartParams, check_memory, initial_params, setup,
                                   stage_optimizer, write_atomically)


class Preempted(Exception):
  """Raised after the preemption checkpoint is on disk; main exits 0."""



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
  write_atomically(path, "".join(keep))


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
  checkpoint (corpo_jax/train/preemption.py)."""
  with contextlib.ExitStack() as nothing_to_save:
    nothing_to_save.enter_context(preemption.terminate_on_sigterm())

    def can_save():
      nothing_to_save.close()
      preemption.install_sigterm_handler()

    return _run_stage(run, index, name, start, can_save)


def _run_stage(run: Run, index: int, name: str, start: Callable[[], Any],
               can_save: Callable[[], None]) -> tuple[Any, list[dict]]:
  stage = run.config[name]
  ckpt = Checkpointer(run.path("checkpoints", name), max_to_keep=run.config.checkpoint.max_to_keep,
                      async_save=run.config.checkpoint.async_save)
  plan = (plans.sft_plan(run, name, stage, index) if stage.kind == "sft"
          else plans.rl_plan(run, name, stage, index, start))
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
