"""One GRPO step: `python -m corpo_jax.bench step [--write_docs] [--sweep group=4,8,16]`.

A random-init model (the rollout benchmark's flags; defaults: the reference config of issue 8)
trained on arithmetic prompts (bundled tokenizer, left-padded or cut to `--prompt_len`), as the
trainer's RL stage does it: `sampling.generate` (temperature 1, completions forced to
`--completion_len`, no EOS), decoding and reward scoring on the host (`rewards.compute`,
exact_match + 0.1 format), `rl.step.make_batch`, then `rl.step.make_update`'s update (one AdamW
step, beta > 0). Each part is timed separately after one compiling step; medians over `--runs`
steps (>= 5). `update_s` includes the reference forward, which make_update runs inside the
jitted update; `ref_forward_s` is that pass (`rl.step.update_logprobs` on the reference
parameters, prompts shared unless `--share_prompt 0`) timed alone, and is not part of `step_s`
= rollout + reward + batch + update.
`mfu` is the update's (see `bench update`); `step_mfu` counts the rollout's forward FLOPs too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from corpo_jax import model, sampling
from corpo_jax.bench import common, update as update_bench
from corpo_jax.data import tasks
from corpo_jax.data.tokenizer import bundled
from corpo_jax.rl import rewards, step as rl_step
from corpo_jax.train import optim
from corpo_jax.train import state as state_lib

SECTION = "GRPO step results (`python -m corpo_jax.bench step`)"
COLUMNS = ["flags", "step s", "rollout s", "reward s", "update s", "ref forward s",
           "rollout tokens/s", "MFU (update)", "load 1m"]
REWARDS = (("exact_match", 1.0), ("format", 0.1))


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_model_args(p)
  update_bench.add_rl_args(p)


def arithmetic_prompts(tokenizer, num: int, length: int, pad_id: int, seed: int):
  """(prompts [num, length] left-padded or cut from the left, mask, Examples)."""
  task = tasks.get("arithmetic")
  examples = [task.example("train", seed * num + i) for i in range(num)]
  tokens = np.full((num, length), pad_id, np.int32)
  for i, ex in enumerate(examples):
    ids = tokenizer.prompt_ids(ex.prompt)[-length:]
    tokens[i, length - len(ids):] = ids
  return tokens, tokens != pad_id, examples, task


def measure(args) -> dict:
  if args.runs < 5:
    raise ValueError(f"--runs={args.runs}: the step benchmark takes the median of >= 5 steps.")
  cfg, rl_cfg = update_bench.configs(args)
  tokenizer = bundled()
  if cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"--vocab={cfg.vocab_size} is smaller than the bundled tokenizer's "
                     f"{tokenizer.vocab_size}; the step benchmark decodes and scores completions.")
  peak_flops = common.matmul_peak(args.peak_size)
  params = model.init_params(cfg, jax.random.key(args.seed))
  optimizer = optim.make_optimizer(rl_cfg, params)
  update = rl_step.make_update(cfg, rl_cfg, None, optimizer)
  state = state_lib.init_state(cfg, optimizer, params)
  B, G = args.prompts, args.group
  prompts_BP, mask_BP, examples, task = arithmetic_prompts(tokenizer, B, args.prompt_len,
                                                           cfg.pad_id, args.seed)
  row_examples = [ex for ex in examples for _ in range(G)]
  ref_logprobs = jax.jit(lambda p, b: rl_step.update_logprobs(
      p, cfg, rl_cfg, b.tokens, b.token_mask, share=rl_step.prompt_sharing(rl_cfg, b))[0])
  times = {k: [] for k in ("rollout_s", "reward_s", "batch_s", "update_s", "ref_forward_s",
                           "step_s", "step_cpu_s")}
  for k in range(args.runs + 1):  # step 0 compiles
    t0, c0 = time.perf_counter(), time.process_time()
    rollout = sampling.generate(state.params, cfg, prompts_BP, mask_BP,
                                rng=jax.random.key(args.seed + k), num_samples=G,
                                max_new_tokens=args.completion_len, eos_id=-1)
    tokens, mask = jax.device_get((rollout.tokens, rollout.mask))
    t1 = time.perf_counter()
    texts = [tokenizer.decode(t[m]) for t, m in zip(tokens, mask)]
    rewards_BG = rewards.compute(REWARDS, texts, row_examples, task).total_N.reshape(B, G)
    t2 = time.perf_counter()
    batch = jax.block_until_ready(rl_step.make_batch(prompts_BP, mask_BP, rollout, rewards_BG))
    t3 = time.perf_counter()
    state, metrics = jax.block_until_ready(update(state, batch, params))
    t4, c4 = time.perf_counter(), time.process_time()
    jax.block_until_ready(ref_logprobs(params, batch))
    t5 = time.perf_counter()
    if k == 0:
      compile_s = t5 - t0
      continue
    for key, value in (("rollout_s", t1 - t0), ("reward_s", t2 - t1), ("batch_s", t3 - t2),
                       ("update_s", t4 - t3), ("ref_forward_s", t5 - t4), ("step_s", t4 - t0),
                       ("step_cpu_s", c4 - c0)):
      times[key].append(value)
  med = {k: statistics.median(v) for k, v in times.items()}
  rows = B * G
  update_flops = update_bench.update_flops(cfg, rl_cfg, args)
  rollout_flops = common.shared_prompt_flops(cfg, B, G, args.prompt_len, args.completion_len)
  return {**{k: round(v, 4) for k, v in med.items()},
          "rollout_tokens_per_s": round(rows * args.completion_len / med["rollout_s"], 1),
          "mfu": round(update_flops / med["update_s"] / peak_flops, 4),
          "step_mfu": round((update_flops + rollout_flops) / med["step_s"] / peak_flops, 4),
          "matmul_peak_gflops_per_s": round(peak_flops / 1e9, 2),
          "reward_mean": round(float(np.mean(rewards_BG)), 4), "compile_s": round(compile_s, 2),
          "runs": args.runs, "load_avg_1m": round(common.load_avg(), 2)}


def main(args) -> None:
  keys = ("step_s", "step_cpu_s", "rollout_s", "update_s")
  for run_args, r in common.sweep(args, measure, keys):
    if args.write_docs:
      common.append_row(SECTION, COLUMNS, [
          f"`{common.flags(run_args)}`", r["step_s"], r["rollout_s"], r["reward_s"],
          r["update_s"], r["ref_forward_s"], r["rollout_tokens_per_s"], r["mfu"],
          r["load_avg_1m"]])
    print(json.dumps(r), flush=True)
