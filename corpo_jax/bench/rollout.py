"""Rollout throughput: `python -m corpo_jax.bench rollout [--write_docs]`.

Random-init model (defaults: the issue's reference config), random prompts of full length,
completions forced to `--completion_len` tokens (no EOS), temperature-1 sampling. Reports the
median over `--runs` timed calls after one compiling call: generated tokens/s (B*G*T_c / time
of one `generate`), the decode step time (decode loop time / T_c) and the prefill time (timed
separately with the jitted prefill alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from corpo_jax import model, sampling
from corpo_jax.bench import common

SECTION = "Rollout results (`--write_docs` appends rows here)"
COLUMNS = ["flags", "tokens/s", "decode step ms", "decode step CPU ms", "prefill ms", "compile s",
           "load 1m"]


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_model_args(p)


def measure(args) -> dict:
  cfg = common.model_config(args)
  params = model.init_params(cfg, jax.random.key(args.seed))
  rng = jax.random.key(args.seed + 1)
  prompts_BP = jax.random.randint(rng, (args.prompts, args.prompt_len), 6, cfg.vocab_size)
  mask_BP = jnp.ones_like(prompts_BP, bool)
  gen = lambda: sampling.generate(params, cfg, prompts_BP, mask_BP, rng=rng,
                                  num_samples=args.group, max_new_tokens=args.completion_len,
                                  eos_id=-1)
  start = time.perf_counter()
  jax.block_until_ready(gen())
  compile_s = time.perf_counter() - start
  total_s, total_cpu_s = common.median_time(gen, args.runs)
  # Prefill alone: a one-token completion is the prefill plus one decode step.
  one = lambda: sampling.generate(params, cfg, prompts_BP, mask_BP, rng=rng,
                                  num_samples=args.group, max_new_tokens=1, eos_id=-1)
  jax.block_until_ready(one())
  one_s, one_cpu_s = common.median_time(one, args.runs)
  steps = args.completion_len
  decode_step_s = (total_s - one_s) / (steps - 1) if steps > 1 else one_s
  tokens = args.prompts * args.group * args.completion_len
  return {"tokens_per_s": round(tokens / total_s, 1),
          "decode_step_ms": round(1e3 * decode_step_s, 3),
          "prefill_ms": round(1e3 * max(one_s - decode_step_s, 0.0), 3),
          "generate_ms": round(1e3 * total_s, 2), "generate_cpu_ms": round(1e3 * total_cpu_s, 2),
          "decode_step_cpu_ms": round(1e3 * (total_cpu_s - one_cpu_s) / max(steps - 1, 1), 3),
          "compile_s": round(compile_s, 2), "runs": args.runs, "devices": jax.device_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(args) -> None:
  result = measure(args)
  if args.write_docs:
    common.append_row(SECTION, COLUMNS, [
        f"`{common.flags(args)}`", result["tokens_per_s"], result["decode_step_ms"],
        result["decode_step_cpu_ms"], result["prefill_ms"], result["compile_s"],
        result["load_avg_1m"]])
  print(json.dumps(result))
