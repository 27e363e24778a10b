"""Times one MoE layer with both dispatch paths against a dense matmul of the same FLOPs.

  python -m corpo_jax.bench.moe_dispatch [--experts 4,8,16,32] [--runs 7] [--out docs/moe_dispatch.md]
  python -m corpo_jax.bench.moe_dispatch --tokens 32,128,256,512,3072 [--runs 7]

With `--tokens`: instead, the two dispatches that replace capacity dispatch when it can drop
nothing (E 4, top-2), `fitted` and `blocks`, per number of tokens N, printed (the data behind
the choice in `moe.MoE`).

Layer: router + top-k routing + SwiGLU experts (D 256, F 1024, top-2, 32 x 96 tokens: the demo
sizes), float32, jitted; "fwd+bwd" is the gradient w.r.t. the input and every weight. Each cell
is the median of `--runs` timed calls after a compile-and-warm-up call. The dense reference is
a SwiGLU of width top_k * F on every token: exactly the FLOPs of the chosen experts (the capacity
path runs capacity_factor times that; `sort` runs exactly that).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from corpo_jax.model import moe
from corpo_jax.model.config import ModelConfig


def _median_seconds(fn, args, runs: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _moe_layer(cfg: ModelConfig, num_tokens: int):
  """y_ND = MoE(x_ND) with the router; params = (router, gate, up, down)."""

  def layer(params, x_ND):
    w_router, *weights = params
    experts_NA, gates_NA = moe.route(x_ND @ w_router, cfg.top_k)
    mask_N = jnp.ones((num_tokens,), bool)
    if cfg.moe_dispatch == "capacity":
      return moe.dispatch_capacity(x_ND, experts_NA, gates_NA, mask_N, weights,
                                   moe.capacity(num_tokens, cfg))
    return moe.dispatch_sort(x_ND, experts_NA, gates_NA, mask_N, weights)

  return layer


def _dense_layer(params, x_ND):
  w_gate_DF, w_up_DF, w_down_FD = params
  return (jax.nn.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD


def _fwd_and_grad(layer):
  loss = lambda params, x: jnp.sum(layer(params, x) ** 2)
  return jax.jit(layer), jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(num_experts: int, runs: int, D: int = 256, F: int = 1024, top_k: int = 2,
            num_tokens: int = 32 * 96) -> dict[str, float]:
  """Median seconds per call: {capacity,sort,dense} x {fwd,fwd+bwd}."""
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)
  x_ND = jnp.asarray(rng.standard_normal((num_tokens, D)), jnp.float32)
  E = num_experts
  moe_params = (normal(D, E), normal(E, D, F), normal(E, D, F), normal(E, F, D))
  dense_params = (normal(D, top_k * F), normal(D, top_k * F), normal(top_k * F, D))
  result = {}
  for name in ("capacity", "sort", "dense"):
    if name == "dense":
      layer, params = _dense_layer, dense_params
    else:
      cfg = ModelConfig.preset("demo", num_experts=E, top_k=top_k, d_model=D, d_ff=F,
                               moe_dispatch=name)
      layer, params = _moe_layer(cfg, num_tokens), moe_params
    fwd, grad = _fwd_and_grad(layer)
    result[f"{name} fwd"] = _median_seconds(fwd, (params, x_ND), runs)
    result[f"{name} fwd+bwd"] = _median_seconds(grad, (params, x_ND), runs)
  return result


def measure_no_drops(num_tokens: int, runs: int, D: int = 256, F: int = 1024, E: int = 4,
                     top_k: int = 2) -> dict[str, float]:
  """Median seconds per call: {fitted,blocks} x {fwd,fwd+bwd} for one layer of N tokens."""
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)
  x_ND = jnp.asarray(rng.standard_normal((num_tokens, D)), jnp.float32)
  params = (normal(D, E), normal(E, D, F), normal(E, D, F), normal(E, F, D))
  mask_N = jnp.ones((num_tokens,), bool)
  dispatch = {"fitted": moe.dispatch_fitted,
              "blocks": lambda *a: moe.dispatch_blocks(*a, moe.block_size(num_tokens * top_k, E))}
  result = {}
  for name, fn in dispatch.items():
    def layer(params, x_ND, fn=fn):
      w_router, *weights = params
      experts_NA, gates_NA = moe.route(x_ND @ w_router, top_k)
      return fn(x_ND, experts_NA, gates_NA, mask_N, weights)
    fwd, grad = _fwd_and_grad(layer)
    result[f"{name} fwd"] = _median_seconds(fwd, (params, x_ND), runs)
    result[f"{name} fwd+bwd"] = _median_seconds(grad, (params, x_ND), runs)
  return result


def main_no_drops(tokens: str, runs: int) -> None:
  print("One layer, E 4, top-2, D 256, F 1024, float32; milliseconds per call (median).")
  print("| N | fitted fwd | blocks fwd | fitted fwd+bwd | blocks fwd+bwd |")
  print("|---|---|---|---|---|")
  for N in (int(n) for n in tokens.split(",")):
    r = measure_no_drops(N, runs)
    cells = [r[f"{n} {p}"] * 1e3 for p in ("fwd", "fwd+bwd") for n in ("fitted", "blocks")]
    print(f"| {N} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experts", default="4,8,16,32", help="comma-separated expert counts")
  parser.add_argument("--runs", type=int, default=7, help="timed calls per cell (median)")
  parser.add_argument("--out", default="docs/moe_dispatch.md", help="markdown report ('' = none)")
  parser.add_argument("--tokens", default="", help="comma-separated N: fitted vs blocks instead")
  args = parser.parse_args()
  if args.tokens:
    main_no_drops(args.tokens, args.runs)
    return
  cf = ModelConfig.preset("demo").capacity_factor
  load_before = os.getloadavg()
  header = ("| E | capacity fwd | sort fwd | dense fwd | capacity fwd+bwd | sort fwd+bwd "
            "| dense fwd+bwd |")
  rows = [header, "|" + "---|" * 7]
  for E in (int(e) for e in args.experts.split(",")):
    r = measure(E, args.runs)
    cells = [r[f"{n} {p}"] * 1e3 for p in ("fwd", "fwd+bwd") for n in ("capacity", "sort", "dense")]
    rows.append(f"| {E} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print(rows[-1], flush=True)
  load_after = os.getloadavg()
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"jax {jax.__version__} ({jax.default_backend()})")
  report = "\n".join([
      "# MoE dispatch: capacity vs sort vs dense, one layer",
      "",
      f"Command: `python -m corpo_jax.bench.moe_dispatch --experts {args.experts} --runs {args.runs}`  ",
      f"Machine: {machine}  ",
      f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
      f"Load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/"
      f"{load_before[2]:.1f}, after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}",
      "",
      f"D 256, F 1024, top-2, 32 x 96 = 3072 tokens, float32, capacity_factor {cf} (the default). "
      "Milliseconds per call, median of the timed calls. Dense: a SwiGLU of width 2F on every "
      "token (the chosen experts' FLOPs).",
      "",
      *rows,
  ])
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  main()
