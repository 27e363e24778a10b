"""RL update throughput: `python -m corpo_jax.bench update [--write_docs] [--sweep experts=4,8]`.

Times `rl.step.make_update`'s jitted step (one AdamW step, beta > 0 so the reference policy's
forward pass runs inside it) on a batch of B*G rows of prompt + completion tokens (random ids,
completions full length, random rewards). Reports the median over `--runs` calls after the
compiling call, and:

* FLOPs, counted analytically (`common.forward_flops`, model FLOPs: chosen experts only, no
  recomputation): policy forward + backward = 3 x forward, plus 1 x forward for the reference
  policy when beta > 0; a forward runs each prompt once for its G rows when
  `--share_prompt 1` (the default, as the trainer does: `common.shared_prompt_flops`), every
  row in full with `--share_prompt 0`. `hlo_flops` is XLA's own count (`compiled.cost_analysis()`) for
  comparison: it counts a loop body once (the log-prob chunks run in a loop), so it is lower.
* MFU: achieved model FLOP/s over the dense-matmul peak measured in the same process
  (`common.matmul_peak`).
* Memory: the compiled step's `memory_analysis()` (arguments + outputs - aliased + temporaries)
  and the process's peak RSS.
* The logits check: the largest float32 logits array (vocab-sized dimension, made by the
  unembedding or a log-softmax) anywhere in the optimised HLO, fused or not, against the full
  batch's [B*G, T, V]; `full_logits_live` must be false (the update projects logits
  `--logprob_chunk` time steps at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import resource
import time

import jax
import jax.numpy as jnp

from corpo_jax import model, sampling
from corpo_jax.bench import common
from corpo_jax.model import ModelConfig
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import optim
from corpo_jax.train import state as state_lib

SECTION = "Update results (`python -m corpo_jax.bench update`)"
COLUMNS = ["flags", "update s", "update CPU s", "model GFLOP", "GFLOP/s", "matmul peak GFLOP/s",
           "MFU", "compiled peak MB", "RSS MB", "largest vocab f32 / full logits", "load 1m"]


def add_rl_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: reference forward)")
  p.add_argument("--logprob_chunk", type=int, default=32, help="rl.logprob_chunk")
  p.add_argument("--micro_batches", type=int, default=1, help="rl.num_micro_batches")
  p.add_argument("--share_prompt", type=int, default=1, help="rl.share_prompt (1 or 0)")
  p.add_argument("--remat", default="none", help="model.remat: none, full or dots")
  p.add_argument("--peak_size", type=int, default=2048, help="n of the n x n x n peak matmul")
  p.add_argument("--sweep", default="", help="NAME=v1,v2,...: one measurement per value of a flag")
  p.add_argument("--plot", default="", help="with --sweep: save a plot of the sweep here (.png)")


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_model_args(p)
  add_rl_args(p)


def configs(args) -> tuple[ModelConfig, RLConfig]:
  cfg = dataclasses.replace(common.model_config(args), remat=args.remat)
  rl_cfg = RLConfig(beta=args.beta, max_completion_len=args.completion_len,
                    logprob_chunk=args.logprob_chunk, num_micro_batches=args.micro_batches,
                    share_prompt=bool(args.share_prompt))
  return cfg, rl_cfg


def update_flops(cfg: ModelConfig, rl_cfg: RLConfig, args) -> float:
  """Model FLOPs of one update call on args' batch (module docstring)."""
  passes = 3 * rl_cfg.num_iterations + (rl_cfg.beta > 0) + (rl_cfg.num_iterations > 1)
  B, G, P, T = args.prompts, args.group, args.prompt_len, args.completion_len
  share = rl_step.group_sharing(rl_cfg, G, P)
  if share:  # each of the G / rows micro-batches runs every prompt once
    rows = share[0]
    return passes * (G // rows) * common.shared_prompt_flops(cfg, B, rows, P, T)
  return passes * common.forward_flops(cfg, B * G, P + T)


def largest_vocab_array(hlo_text: str, vocab: int) -> int:
  """Elements of the largest float32 logits-like array in `hlo_text`: an instruction with a
  `vocab`-sized dimension made by the unembedding (einsum "BTD,DV->BTV" and its transposes) or
  a log-softmax, by its op_name metadata (a shape alone is ambiguous when d_ff == vocab)."""
  best = 0
  for line in hlo_text.splitlines():
    shape = re.search(r"= f32\[([\d,]+)\]", line)
    name = re.search(r'op_name="([^"]*)"', line)
    if not (shape and name and re.search(r"log_softmax|BTV", name.group(1))):
      continue
    dims = [int(d) for d in shape.group(1).split(",")]
    if vocab in dims:
      best = max(best, math.prod(dims))
  return best


def random_batch(cfg: ModelConfig, args, rng: jax.Array) -> rl_step.Batch:
  """B*G rows: a full-length random prompt shared by the G rows of a group, then a full-length
  random completion (`rl.step.make_batch`)."""
  B, G, P, T = args.prompts, args.group, args.prompt_len, args.completion_len
  prompts_BP = jax.random.randint(rng, (B, P), 6, cfg.vocab_size)
  completions = jax.random.randint(jax.random.fold_in(rng, 2), (B * G, T), 6, cfg.vocab_size)
  rollout = sampling.Rollout(tokens=completions, mask=jnp.ones_like(completions, bool),
                             logprobs=None, lengths=None, truncated=jnp.ones((B * G,), bool),
                             experts=None)
  rewards_BG = jax.random.normal(jax.random.fold_in(rng, 1), (B, G))
  return rl_step.make_batch(prompts_BP, jnp.ones_like(prompts_BP, bool), rollout, rewards_BG)


def analyse(update, state, batch, ref_params, vocab: int) -> dict:
  """Cost, memory and the logits check of the compiled step (module docstring)."""
  compiled = update.lower(state, batch, ref_params).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  rows, length = batch.tokens.shape
  largest = largest_vocab_array(compiled.as_text(), vocab)
  return {"hlo_flops": float(cost.get("flops", 0.0)),
          "compiled_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1),
          "compiled_peak_mb": round(peak / 2**20, 1),
          "largest_vocab_f32_elems": largest, "full_logits_elems": rows * length * vocab,
          "full_logits_live": largest >= rows * length * vocab}


def measure(args) -> dict:
  cfg, rl_cfg = configs(args)
  peak_flops = common.matmul_peak(args.peak_size)
  params = model.init_params(cfg, jax.random.key(args.seed))
  optimizer = optim.make_optimizer(rl_cfg, params)
  update = rl_step.make_update(cfg, rl_cfg, None, optimizer)
  state = state_lib.init_state(cfg, optimizer, params)
  batch = random_batch(cfg, args, jax.random.key(args.seed + 1))
  result = analyse(update, state, batch, params, cfg.vocab_size)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(update(state, batch, params))
  compile_s = time.perf_counter() - start

  def one():
    nonlocal state
    state, metrics = update(state, batch, params)
    return metrics

  update_s, update_cpu_s = common.median_time(one, args.runs)
  flops = update_flops(cfg, rl_cfg, args)
  return {"update_s": round(update_s, 4), "update_cpu_s": round(update_cpu_s, 4),
          "model_gflop": round(flops / 1e9, 3), "gflops_per_s": round(flops / update_s / 1e9, 2),
          "matmul_peak_gflops_per_s": round(peak_flops / 1e9, 2),
          "mfu": round(flops / update_s / peak_flops, 4), **result,
          "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          "compile_s": round(compile_s, 2), "runs": args.runs,
          "load_avg_1m": round(common.load_avg(), 2)}


def docs_cells(args, r: dict) -> list:
  return [f"`{common.flags(args)}`", r["update_s"], r["update_cpu_s"], r["model_gflop"],
          r["gflops_per_s"], r["matmul_peak_gflops_per_s"], r["mfu"], r["compiled_peak_mb"],
          r["rss_peak_mb"], f"{r['largest_vocab_f32_elems']} / {r['full_logits_elems']}",
          r["load_avg_1m"]]


def main(args) -> None:
  for run_args, result in common.sweep(args, measure, ("update_s", "update_cpu_s")):
    if args.write_docs:
      common.append_row(SECTION, COLUMNS, docs_cells(run_args, result))
    print(json.dumps(result), flush=True)
