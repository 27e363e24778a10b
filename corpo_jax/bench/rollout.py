"""Rollout throughput: `python -m corpo_jax.bench rollout [--write_docs]`.

Random-init model (defaults: the issue's reference config), random prompts of full length,
completions forced to `--completion_len` tokens (no EOS), temperature-1 sampling. Reports the
median over `--runs` timed calls after one compiling call: generated tokens/s (B*G*T_c / time
of one `generate`), the decode step time (decode loop time / T_c) and the prefill time (timed
separately with the jitted prefill alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from corpo_jax import model, sampling
from corpo_jax.model import ModelConfig

_DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "benchmarks.md")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--ffn", type=int, default=1024)
  p.add_argument("--experts", type=int, default=4)
  p.add_argument("--topk", type=int, default=2)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--thinking_layers", type=int, default=0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--moe_dispatch", default="capacity")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--completion_len", type=int, default=64)
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--write_docs", action="store_true", help="append a row to docs/benchmarks.md")


def _config(args) -> ModelConfig:
  return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.d_model // args.heads, d_ff=args.ffn,
                     num_experts=args.experts, top_k=args.topk,
                     max_seq_len=2 * (args.prompt_len + args.completion_len) + 32,
                     thinking_layers=args.thinking_layers, dtype=args.dtype,
                     param_dtype=args.dtype, moe_dispatch=args.moe_dispatch)


def _median_time(fn, runs: int) -> tuple[float, float]:
  """Median wall-clock and process CPU seconds of fn() (CPU time: less sensitive to other
  processes sharing the cores)."""
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def measure(args) -> dict:
  cfg = _config(args)
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
  total_s, total_cpu_s = _median_time(gen, args.runs)
  # Prefill alone: a one-token completion is the prefill plus one decode step.
  one = lambda: sampling.generate(params, cfg, prompts_BP, mask_BP, rng=rng,
                                  num_samples=args.group, max_new_tokens=1, eos_id=-1)
  jax.block_until_ready(one())
  one_s, one_cpu_s = _median_time(one, args.runs)
  steps = args.completion_len
  decode_step_s = (total_s - one_s) / (steps - 1) if steps > 1 else one_s
  tokens = args.prompts * args.group * args.completion_len
  return {"tokens_per_s": round(tokens / total_s, 1),
          "decode_step_ms": round(1e3 * decode_step_s, 3),
          "prefill_ms": round(1e3 * max(one_s - decode_step_s, 0.0), 3),
          "generate_ms": round(1e3 * total_s, 2), "generate_cpu_ms": round(1e3 * total_cpu_s, 2),
          "decode_step_cpu_ms": round(1e3 * (total_cpu_s - one_cpu_s) / max(steps - 1, 1), 3), "compile_s": round(compile_s, 2),
          "runs": args.runs, "devices": jax.device_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2)}


def _write_docs(args, result: dict) -> None:
  flags = " ".join(f"--{k}={v}" for k, v in sorted(vars(args).items())
                   if k not in ("command", "write_docs", "runs", "seed"))
  if not os.path.exists(_DOCS):
    with open(_DOCS, "w") as f:
      f.write("# Benchmarks\n\n## Rollout (`python -m corpo_jax.bench rollout`)\n\n"
              "| date (UTC) | machine | flags | tokens/s | decode step ms | prefill ms | "
              "compile s | load 1m |\n|---|---|---|---|---|---|---|---|\n")
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  with open(_DOCS, "a") as f:
    f.write(f"| {date} | {machine} | `{flags}` | {result['tokens_per_s']} | "
            f"{result['decode_step_ms']} | {result['prefill_ms']} | {result['compile_s']} | "
            f"{result['load_avg_1m']} |\n")


def main(args) -> None:
  result = measure(args)
  if args.write_docs:
    _write_docs(args, result)
  print(json.dumps(result))
