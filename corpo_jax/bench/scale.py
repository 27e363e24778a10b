"""Ahead-of-time scale check: `python -m corpo_jax.bench scale [--write_docs]`.

--write_docs rewrites the figures in docs/scale.md and keeps its "## Analysis" section.

Lowers and compiles the RL update (rl/step.py make_update: policy, reference policy, AdamW state
donated) of a model preset for a mesh of fake CPU devices, allocating nothing, and reports per
device: the parameters, optimizer state and reference parameters (their shard sizes), the batch,
and the compiler's memory analysis (arguments, temporaries = activations, gradients and update
buffers, outputs not aliased to the donated state). The peak a TPU chip needs is about
arguments + temporaries + unaliased outputs (XLA:TPU lays buffers out differently; the CPU
compiler's figure is an estimate of the same program). It must be the first JAX user in its
process: it sets the CPU device count itself.

Defaults: mixtral_8x7b on 256 devices, data 4 x fsdp 16 x expert 4 x tensor 1, 64 prompts x 8
samples of 512 + 1024 tokens in 2 micro-batches, beta 0.04 (the reference pass is compiled in),
the preset's MoE dispatch (--moe_dispatch overrides it). The last line printed is one JSON
object: per_device_bytes, peak_gib_per_device, arguments_gib, temps_gib,
collective_gib_per_layer and all_to_all_per_layer (`collectives`), fits per TPU generation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from corpo_jax import model, sharding
from corpo_jax.model import ModelConfig
from corpo_jax.rl import step as rl_step
from corpo_jax.rl.config import REFERENCE_DTYPES, RLConfig
from corpo_jax.rl.reference import reference_policy
from corpo_jax.train import memory, optim
from corpo_jax.train import state as state_lib

_DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "scale.md")
GIB = 1024 ** 3
_NOTES = "\n## Analysis"
# Per TPU generation: HBM per chip (GiB) and the slice name for n chips (v4 and v5p names
# count TensorCores, two per chip; v5e and v6e slices stop at 256 chips).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_SLICE = {"v4": lambda n: f"v4-{2 * n}", "v5e": lambda n: f"v5litepod-{n}" if n <= 256 else "-",
          "v5p": lambda n: f"v5p-{2 * n}", "v6e": lambda n: f"v6e-{n}" if n <= 256 else "-"}


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="mixtral_8x7b", help="a ModelConfig preset")
  p.add_argument("--moe_dispatch", default="", help="override the preset's model.moe_dispatch "
                 "(capacity | sort | expert_parallel | cpu_dropless)")
  p.add_argument("--mesh", default="4,16,4,1", help="data,fsdp,expert,tensor sizes")
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--completion_len", type=int, default=1024)
  p.add_argument("--micro_batches", type=int, default=2)
  p.add_argument("--beta", type=float, default=0.04, help="> 0 compiles the reference pass")
  p.add_argument("--reference_dtype", default="param", choices=REFERENCE_DTYPES,
                 help="rl.reference_dtype: the reference policy as the params, or a bfloat16 copy")
  p.add_argument("--remat", default="", help="override the preset's model.remat (full | dots | "
                 "experts | dots_and_experts)")
  p.add_argument("--program", default="update", choices=("update", "rollout", "step"),
                 help="the RL update, the rollout of the same rows (sampling.generate: prefill, "
                      "then decode completion_len tokens into a prompt+completion cache), or "
                      "the whole RL step: both, with what stays resident on the devices")
  p.add_argument("--rollout_layout", default="decode", choices=("train", "decode"),
                 help="rollout only: sample with the trainer's float32 parameters, or with the "
                      "compute-dtype copy on the decode view of the mesh (model.for_decoding)")
  p.add_argument("--write_docs", action="store_true", help="write docs/scale.md (update only)")


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _setup(args):
  mesh_shape = tuple(int(s) for s in args.mesh.split(","))
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
  overrides = {k: getattr(args, k) for k in ("moe_dispatch", "remat") if getattr(args, k)}
  cfg = ModelConfig.preset(args.model, **overrides)
  return sharding.make_mesh(mesh_shape), cfg


def _summary(args, cfg, mesh, compiled, figures: dict, tokens: int, lower_s, compile_s) -> dict:
  comm = collectives(compiled.as_text(), tokens)
  layout = {"rollout_layout": args.rollout_layout} if args.program == "rollout" else {}
  return {"program": args.program, **layout, "model": args.model, "moe_dispatch": cfg.moe_dispatch,
          "remat": cfg.remat, "reference_dtype": args.reference_dtype,
          "parameters": model.count_params(model.abstract_params(cfg)),
          "mesh": tuple(mesh.shape.values()), "devices": mesh.size,
          "rows": args.prompts * args.group, "tokens_per_row": args.prompt_len + args.completion_len,
          "per_device_bytes": figures,
          "peak_gib_per_device": round(figures["peak"] / GIB, 2),
          "arguments_gib": round(figures["arguments"] / GIB, 2),
          "temps_gib": round(figures["temporaries"] / GIB, 2),
          "collective_gib_per_layer": round(sum(k["gib"] for k in comm["by_kind"].values()), 3),
          "all_to_all_per_layer": comm["by_kind"].get("all-to-all", {}).get("ops", 0),
          "collectives": comm, "fits": fits(figures["peak"]), "lower_s": round(lower_s, 1),
          "compile_s": round(compile_s, 1)}


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  figures = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
             "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes}
  figures["peak"] = sum(figures.values())
  return figures


def measure_rollout(args) -> dict:
  """Compiles `sampling.generate`'s program for the rows of the update (no allocation)."""
  from corpo_jax import sampling  # pylint: disable=g-import-not-at-top
  mesh, cfg = _setup(args)
  if args.rollout_layout == "decode":  # the copy model.for_decoding makes
    cfg = model.decoding_config(cfg)
    mesh = sharding.decode_mesh(mesh)
  params = _abstract(nn.unbox(model.abstract_params(cfg)), model.param_shardings(cfg, mesh))
  prompts = jax.ShapeDtypeStruct((args.prompts, args.prompt_len), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh, (args.prompts,)))
  mask = jax.ShapeDtypeStruct(prompts.shape, bool, sharding=prompts.sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = sampling._jitted("cpu").lower(  # pylint: disable=protected-access
        params, prompts, mask, jax.eval_shape(lambda: jax.random.key(0)), scalar, scalar, scalar,
        cfg=cfg, strategy=(sampling.Temperature(1.0),), num_samples=args.group,
        completion_size=args.completion_len)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  figures = {"params": memory.per_device_bytes(params),
             **_memory(compiled)}
  return _summary(args, cfg, mesh, compiled, figures, args.prompts * args.group,
                  lower_s, time.perf_counter() - start - lower_s)


def measure(args) -> dict:
  if args.program == "rollout":
    return measure_rollout(args)
  if args.program == "step":
    return measure_step(args)
  mesh, cfg = _setup(args)
  T = args.prompt_len + args.completion_len
  rl_cfg = RLConfig(beta=args.beta, num_micro_batches=args.micro_batches,
                    max_completion_len=args.completion_len, reference_dtype=args.reference_dtype)
  optimizer = optim.make_optimizer(rl_cfg, model.abstract_params(cfg))
  update = rl_step.make_update(cfg, rl_cfg, mesh, optimizer)

  params = nn.unbox(model.abstract_params(cfg))
  state = jax.eval_shape(lambda p: state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
      skipped=jnp.zeros((), jnp.int32)), params)
  state_sh = state_lib.state_shardings(cfg, optimizer, mesh)
  param_sh = model.param_shardings(cfg, mesh)
  BG = args.prompts * args.group
  rows = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)
  batch = rl_step.Batch(tokens=rows(jnp.int32, BG, T), token_mask=rows(bool, BG, T),
                        loss_mask=rows(bool, BG, T), rewards=rows(jnp.float32, args.prompts,
                                                                  args.group),
                        truncated=rows(bool, BG), experts=None)
  batch_sh = rl_step.batch_shardings(mesh, with_experts=False)
  ref = (reference_policy(_abstract(params, param_sh), args.reference_dtype) if args.beta > 0
         else None)

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = update.jitted(batch.prompt_len).lower(
        _abstract(state, state_sh), _abstract(batch, batch_sh), ref, optim.hyperparams(rl_cfg))
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  figures = {
      "params": memory.per_device_bytes(_abstract(state.params, state_sh.params)),
      "optimizer": memory.per_device_bytes(_abstract(state.opt_state, state_sh.opt_state)),
      "reference": memory.per_device_bytes(ref) if ref is not None else 0,
      "batch": memory.per_device_bytes(_abstract(batch, batch_sh)),
      **_memory(compiled),
  }
  return _summary(args, cfg, mesh, compiled, figures, BG // args.micro_batches * T, lower_s,
                  compile_s)


def measure_step(args) -> dict:
  """One RL step on the trainer's devices: the rollout runs while the train state and the
  reference policy stay resident (and, in the decode layout, beside the sampler's copy, which
  the rollout's arguments count), then the update. The step's peak is the larger phase; the
  other figures are the update's."""
  with_program = lambda name: argparse.Namespace(**{**vars(args), "program": name})
  update, rollout = measure(with_program("update")), measure(with_program("rollout"))
  f, g = update["per_device_bytes"], rollout["per_device_bytes"]
  resident = f["optimizer"] + f["reference"] + (f["params"] if args.rollout_layout == "decode"
                                                else 0)  # else the rollout's argument
  phases = {"rollout": resident + g["peak"], "update": f["peak"]}
  peak = max(phases.values())
  return {**update, "program": "step", "rollout_layout": args.rollout_layout,
          "phases_gib": {k: round(v / GIB, 2) for k, v in phases.items()},
          "rollout_peak_gib": rollout["peak_gib_per_device"],
          "peak_gib_per_device": round(peak / GIB, 2), "fits": fits(peak)}


_COLLECTIVE = re.compile(r"= (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter|"
                         r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo_text: str, tokens: int) -> dict:
  """The compiled module's collectives, each op counted once: {kind: {ops, gib}}, the largest
  op's GiB, how many ops have a dimension of `tokens` (the micro-batch's token count in the
  update: such an op moves the whole micro-batch's activations or router outputs), and the
  shapes all-gathered (a weight's shape there is a weight gathered). The update's layers are one
  loop whose body appears once, so its figures are one layer's collectives (forward, backward,
  reference pass) plus the few outside the layers; the rollout's decode passes unroll the
  layers, so its figures are the whole model's prefill and decode step."""
  kinds, largest, global_ops, gathered = {}, 0, 0, set()
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    shapes = [(t, [int(d) for d in dims.split(",") if d]) for t, dims in
              _SHAPE.findall(match.group(1))]
    size = sum(_BYTES[t] * math.prod(dims) for t, dims in shapes)
    kind = kinds.setdefault(match.group(2), {"ops": 0, "gib": 0.0})
    kind["ops"] += 1
    kind["gib"] += size / GIB
    largest = max(largest, size)
    global_ops += any(tokens in dims for _, dims in shapes)
    if match.group(2) == "all-gather":
      gathered.update(tuple(dims) for _, dims in shapes)
  return {"by_kind": {k: {"ops": v["ops"], "gib": round(v["gib"], 3)} for k, v in kinds.items()},
          "largest_gib": round(largest / GIB, 3), "ops_with_micro_batch_tokens": global_ops,
          "all_gather_shapes": sorted(gathered)}


def fits(peak_bytes: int) -> dict[str, bool]:
  """Whether `peak_bytes` per chip fits each TPU generation's HBM (whole GiB, no headroom)."""
  return {name: peak_bytes <= gib * GIB for name, gib in TPU_HBM_GIB.items()}


def _command(args) -> str:
  flags = " ".join(f"--{k}={v}" for k, v in sorted(vars(args).items())
                   if k not in ("command", "write_docs") and v != "")
  return f"python -m corpo_jax.bench scale {flags} --write_docs"


def _write_docs(args, r: dict) -> None:
  f = r["per_device_bytes"]
  gib = lambda b: f"{b / GIB:.2f}"
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  lines = [
      "# Scale: the RL update compiled ahead of time for a TPU-sized mesh",
      "",
      f"Written by `{_command(args)}` ({date} UTC, jax {jax.__version__}, fake CPU devices).",
      "",
      f"The RL update (`rl/step.py` make_update: policy, reference policy, AdamW state, donated "
      f"state) of `{r['model']}` ({r['parameters'] / 1e9:.1f}B parameters, float32 parameters "
      f"and optimizer state, bfloat16 compute, full remat) lowered in {r['lower_s']} s and "
      f"compiled in {r['compile_s']} s for {r['devices']} devices, mesh data x fsdp x expert x "
      f"tensor = {' x '.join(map(str, r['mesh']))}, on {r['rows']} rows (prompts x samples) of "
      f"{r['tokens_per_row']} tokens in {args.micro_batches} micro-batches.",
      "",
      "| per device | GiB |",
      "|---|---|",
      f"| parameters | {gib(f['params'])} |",
      f"| AdamW state | {gib(f['optimizer'])} |",
      f"| reference parameters | {gib(f['reference'])} |",
      f"| batch | {gib(f['batch'])} |",
      f"| arguments (compiler; = the four above) | {gib(f['arguments'])} |",
      f"| temporaries (activations, gradients, update buffers) | {gib(f['temporaries'])} |",
      f"| outputs not aliased to the donated state | {gib(f['outputs_not_aliased'])} |",
      f"| **peak estimate** (arguments + temporaries + unaliased outputs) | "
      f"**{gib(f['peak'])}** |",
      "",
      f"Collectives of the compiled program (`collectives`: each op once; the layers are one "
      f"loop, so one layer's forward, backward and reference pass), MoE dispatch "
      f"`{r['moe_dispatch']}`:",
      "",
      "| kind | ops | GiB |",
      "|---|---|---|",
      *[f"| {k} | {v['ops']} | {v['gib']:.2f} |" for k, v in r["collectives"]["by_kind"].items()],
      f"| largest single op | | {r['collectives']['largest_gib']:.2f} |",
      f"| ops with a dimension of the micro-batch's tokens | "
      f"{r['collectives']['ops_with_micro_batch_tokens']} | |",
      "",
      f"| TPU generation | slice of {r['devices']} chips | HBM per chip | peak fits |",
      "|---|---|---|---|",
      *[f"| {k} | {_SLICE[k](r['devices'])} | {TPU_HBM_GIB[k]} GiB | {'yes' if ok else 'no'} |"
        for k, ok in r["fits"].items()],
      "",
  ]
  notes = ""  # the hand-written analysis below the figures survives a rewrite
  if os.path.exists(_DOCS):
    with open(_DOCS) as f:
      text = f.read()
    notes = text[text.index(_NOTES):] if _NOTES in text else ""
  with open(_DOCS, "w") as out:
    out.write("\n".join(lines) + notes)


def main(args) -> None:
  result = measure(args)
  if args.write_docs:
    _write_docs(args, result)
  print(json.dumps(result))
