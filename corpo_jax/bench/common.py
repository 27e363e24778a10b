"""What the benchmarks share: model flags, timing, the machine's matmul peak, FLOP counts and
rows appended to docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from corpo_jax.model import ModelConfig

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "benchmarks.md")
# Flags that do not change what is measured (left out of the flags column of docs rows).
_NOT_FLAGS = ("command", "write_docs", "runs", "seed", "sweep", "plot", "peak_size")


def add_model_args(p: argparse.ArgumentParser) -> None:
  """Model and batch flags; the defaults are the reference config of issues 3 and 8."""
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
  p.add_argument("--moe_dispatch", default="cpu_dropless")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--completion_len", type=int, default=64)
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--write_docs", action="store_true", help="append a row to docs/benchmarks.md")


def model_config(args) -> ModelConfig:
  return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.d_model // args.heads, d_ff=args.ffn,
                     num_experts=args.experts, top_k=args.topk,
                     max_seq_len=2 * (args.prompt_len + args.completion_len) + 32,
                     thinking_layers=args.thinking_layers, dtype=args.dtype,
                     param_dtype=args.dtype, moe_dispatch=args.moe_dispatch)


def median_time(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
  """Median wall-clock and process CPU seconds of fn() (CPU time: less sensitive to other
  processes sharing the cores)."""
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def matmul_peak(n: int = 2048, runs: int = 5) -> float:
  """FLOP/s of a jitted float32 [n, n] @ [n, n] matmul on the default device (median of
  `runs`): the dense-matmul peak MFU is measured against, taken in the caller's process."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  wall, _ = median_time(lambda: f(a), runs)
  return 2 * n ** 3 / wall


def forward_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Model FLOPs (2 per multiply-add) of one causal forward pass over [batch, length] tokens,
  logits included: the chosen experts only (top_k, no capacity padding) and causal attention
  (query t attends over t + 1 keys). Element-wise ops are not counted."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  per_token_layer = (2 * D * (N + 2 * K) * H + 2 * N * H * D  # q, k, v and output projections
                     + 2 * D * cfg.num_experts  # router
                     + cfg.top_k * 3 * 2 * D * F)  # SwiGLU experts
  tokens = batch * length
  attention = 2 * 2 * N * H * batch * length * (length + 1) / 2  # scores and value mix
  layers = cfg.num_layers + cfg.thinking_layers
  return layers * (tokens * per_token_layer + attention) + tokens * 2 * D * cfg.vocab_size


def shared_prompt_flops(cfg: ModelConfig, prompts: int, group: int, prompt_len: int,
                        completion_len: int) -> float:
  """`forward_flops` of prompts x group rows of prompt + completion when each prompt runs once
  and its keys and values serve its group's completions (the sampler, `rl.share_prompt`)."""
  rows, length = prompts * group, prompt_len + completion_len
  return (forward_flops(cfg, rows, length) - forward_flops(cfg, rows, prompt_len)
          + forward_flops(cfg, prompts, prompt_len))


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def machine() -> str:
  if jax.default_backend() == "cpu":
    return f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}"
  return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"


def flags(args, **overrides) -> str:
  values = {**vars(args), **overrides}
  return " ".join(f"--{k}={v}" for k, v in sorted(values.items()) if k not in _NOT_FLAGS)


def append_row(section: str, header: list[str], cells: list[Any], path: str = DOCS) -> None:
  """Adds a table row (date and machine first) under the heading `section` of docs/benchmarks.md,
  after that section's last table line; the section and its table are created if missing."""
  row = "| " + " | ".join(str(c) for c in [
      datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), machine(),
      *cells]) + " |"
  lines = open(path).read().splitlines() if os.path.exists(path) else ["# Benchmarks"]
  heading = f"### {section}"
  if heading not in lines:
    columns = ["date (UTC)", "machine", *header]
    lines += ["", heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  start = lines.index(heading)
  end = start + 1
  while end < len(lines) and not lines[end].startswith("#"):
    end += 1
  last_table_line = max(i for i in range(start, end) if lines[i].startswith("|"))
  lines.insert(last_table_line + 1, row)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def load_avg() -> float:
  return os.getloadavg()[0]


def sweep(args, measure: Callable[[Any], dict], plot_keys: tuple[str, ...]
          ) -> Iterator[tuple[Any, dict]]:
  """(args, measure(args)) once, or, with `--sweep NAME=v1,v2,...`, once per value of flag NAME
  (the result then also holds NAME); with `--plot PATH` the sweep's `plot_keys` are plotted."""
  if not args.sweep:
    yield args, measure(args)
    return
  name, _, values = args.sweep.partition("=")
  if name not in vars(args) or name in _NOT_FLAGS or not values:
    raise ValueError(f"--sweep={args.sweep!r}: expected NAME=v1,v2,... with NAME a flag such as "
                     f"experts, group or completion_len.")
  points = []
  for value in values.split(","):
    run_args = argparse.Namespace(**{**vars(args), name: type(getattr(args, name))(value)})
    result = {name: getattr(run_args, name), **measure(run_args)}
    points.append(result)
    yield run_args, result
  if args.plot:
    plot(points, name, plot_keys, f"{args.command} --sweep {args.sweep}", args.plot)


def plot(points: list[dict], x: str, keys: tuple[str, ...], title: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key in keys:
    ax.plot([p[x] for p in points], [p[key] for p in points], "o-", label=key)
  ax.set_xscale("log", base=2)
  ax.set_xticks([p[x] for p in points], [str(p[x]) for p in points])
  ax.set_xlabel(x)
  ax.set_ylabel("seconds")
  ax.set_ylim(bottom=0)
  ax.set_title(title, fontsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
