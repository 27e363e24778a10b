"""`python -m corpo_jax.bench scale`: the full mixtral_8x7b RL update (policy, reference, AdamW
state) lowers and compiles for 256 fake devices (data 4 x fsdp 16 x expert 4 x tensor 1) and
fits in 24 GiB per device, with expert-parallel MoE collectives only.

Measured here: ~20 s of CPU for lowering + compiling (1.5-3 min wall on the loaded 2-core
machine), under 1 GiB of memory; nothing is allocated. It runs in a subprocess: the device count
is fixed when JAX starts, and conftest.py gave this process 8.
"""

import json
import os
import subprocess
import sys

import pytest

from corpo_jax.bench import scale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1024 ** 3


@pytest.mark.slow
def test_mixtral_8x7b_update_compiles_for_256_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the script sets its own device count
  proc = subprocess.run([sys.executable, "-m", "corpo_jax.bench", "scale"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  f = r["per_device_bytes"]
  assert r["devices"] == 256 and abs(r["parameters"] - 46.7e9) / 46.7e9 < 0.01
  # float32 parameters split 14.5-way on average (experts 64-way over fsdp x expert, the rest
  # 16-way over fsdp): 3.0 GiB each of policy and reference, twice that of AdamW moments.
  assert 2.9 * GIB < f["params"] < 3.1 * GIB
  assert f["reference"] == f["params"] and f["optimizer"] == 2 * f["params"] + 8  # + 2 counts
  # The compiled program's arguments are exactly these shards (no replicated copy).
  state = f["params"] + f["optimizer"] + f["reference"] + f["batch"]
  assert abs(f["arguments"] - state) < 1024
  assert f["temporaries"] > 0 and f["peak"] == (
      f["arguments"] + f["temporaries"] + f["outputs_not_aliased"])
  assert r["fits"] == scale.fits(f["peak"])
  # Expert-parallel MoE (the preset's dispatch): every device routes and dispatches its own
  # tokens, slots go to the experts' owners by all_to_all, and no collective moves the whole
  # micro-batch's tokens (the "capacity" dispatch had 16 such ops and a 128 GiB peak).
  assert r["moe_dispatch"] == "expert_parallel" and r["all_to_all_per_layer"] >= 4
  assert r["collectives"]["ops_with_micro_batch_tokens"] == 0
  assert r["peak_gib_per_device"] <= 24.0 and r["collectives"]["largest_gib"] < 2.0


def test_fits_compares_with_each_chips_hbm():
  assert scale.fits(16 * GIB) == {"v4": True, "v5e": True, "v5p": True, "v6e": True}
  assert scale.fits(16 * GIB + 1) == {"v4": True, "v5e": False, "v5p": True, "v6e": True}
  assert scale.fits(40 * GIB) == {"v4": False, "v5e": False, "v5p": True, "v6e": False}
  assert scale.fits(96 * GIB) == {"v4": False, "v5e": False, "v5p": False, "v6e": False}


@pytest.mark.slow
def test_mixtral_8x7b_rollout_in_the_decode_layout_fits():
  """The rollout of the same 512 rows (shorter: 128 + 256 tokens) on the decode view of the
  256 devices (4 x 1 x 4 x 16): the compute-dtype copy is split over expert x tensor, no weight
  is all-gathered (d_ff 14336 and the attention projections never appear in one)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "corpo_jax.bench", "scale", "--program=rollout",
                         "--prompt_len=128", "--completion_len=256"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["rollout_layout"] == "decode" and r["mesh"] == [4, 1, 4, 16]
  assert r["arguments_gib"] < 2.5 and r["peak_gib_per_device"] <= 20.0
  assert r["all_to_all_per_layer"] > 0
  assert not [s for s in r["collectives"]["all_gather_shapes"]
              if 14336 in s or {4096, 128} <= set(s) and (32 in s or 8 in s) and len(s) == 3]


def test_collectives_reads_kinds_sizes_and_token_dims():
  hlo = "\n".join([
      "  %all-to-all.1 = (f32[2,256,4096]{2,1,0}, bf16[2,256,4096]{2,1,0}) all-to-all(%a, %b), "
      "replica_groups={{0,1}}",
      "  %ag = f32[131072,8]{1,0} all-gather(%c), dimensions={0}",
      "  %ar-start = f32[4]{0} all-reduce-start(%d), to_apply=%add",
      "  %ar-done = f32[4]{0} all-reduce-done(%ar-start)",
      "  %dot = f32[131072,8]{1,0} dot(%e, %f)",
  ])
  c = scale.collectives(hlo, tokens=131072)
  a2a = (2 * 256 * 4096) * (4 + 2) / GIB
  assert c["by_kind"] == {"all-to-all": {"ops": 1, "gib": round(a2a, 3)},
                          "all-gather": {"ops": 1, "gib": round(131072 * 8 * 4 / GIB, 3)},
                          "all-reduce": {"ops": 1, "gib": 0.0}}
  assert c["largest_gib"] == round(a2a, 3) and c["ops_with_micro_batch_tokens"] == 1
  assert c["all_gather_shapes"] == [(131072, 8)]


def test_step_program_adds_what_stays_resident_during_the_rollout(monkeypatch):
  """--program=step: the rollout runs beside the optimizer state and the reference (and, in the
  decode layout, the float32 params, which the sampler does not read); the larger phase is the
  step's peak. The figures are the 8x7B ones of docs/scale.md, in bytes."""
  update = {"per_device_bytes": {"params": 3 * GIB, "optimizer": 6 * GIB,
                                 "reference": int(1.5 * GIB), "peak": int(22.17 * GIB)},
            "peak_gib_per_device": 22.17, "program": "update"}
  rollout = {"per_device_bytes": {"peak": int(6.45 * GIB)}, "peak_gib_per_device": 6.45}
  monkeypatch.setattr(scale, "measure_rollout", lambda args: rollout)
  real_measure = scale.measure
  monkeypatch.setattr(scale, "measure", lambda args: update if args.program == "update"
                      else real_measure(args))
  p = scale.argparse.ArgumentParser()
  scale.add_args(p)
  r = scale.measure(p.parse_args(["--program=step", "--rollout_layout=decode"]))
  assert r["program"] == "step" and r["phases_gib"] == {"rollout": 16.95, "update": 22.17}
  assert r["peak_gib_per_device"] == 22.17 and r["fits"] == scale.fits(int(22.17 * GIB))
  r = scale.measure(p.parse_args(["--program=step", "--rollout_layout=train"]))
  assert r["phases_gib"]["rollout"] == 13.95  # the sampler reads the trainer's params
