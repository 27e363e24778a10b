"""Benchmarks: FLOP counting, the logits check, docs rows, and the subcommands' JSON on a tiny
model (the speed targets are checked by running the benchmarks, not here)."""

import argparse
import json

import pytest

from corpo_jax.bench import common, rollout, step, update
from corpo_jax.model import ModelConfig
from corpo_jax.rl.config import RLConfig

TINY = ["--layers=1", "--d_model=32", "--heads=2", "--kv_heads=2", "--ffn=64", "--experts=4",
        "--prompts=2", "--group=2", "--prompt_len=8", "--completion_len=8", "--logprob_chunk=4",
        "--peak_size=64"]


def _args(module, argv):
  parser = argparse.ArgumentParser()
  module.add_args(parser)
  args = parser.parse_args(argv)
  args.command = module.__name__.rsplit(".", 1)[-1]
  return args


def test_forward_flops_hand_counted():
  cfg = ModelConfig(vocab_size=5, d_model=2, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=2, d_ff=3, num_experts=2, top_k=1, pad_id=0, think_start_id=-1,
                    think_end_id=-1)
  # Per token: q,k,v 2*2*3*2 = 24, out 2*1*2*2 = 8, router 2*2*2 = 8, one expert 3*2*2*3 = 36.
  # Two tokens: 2 * 76 = 152; attention over 1 + 2 keys: 2 * 2 * 1 * 2 * 3 = 24; logits 2*2*2*5 = 40.
  assert common.forward_flops(cfg, batch=1, length=2) == 152 + 24 + 40
  assert common.forward_flops(cfg, batch=3, length=2) == 3 * (152 + 24 + 40)


def test_update_flops_counts_passes():
  cfg = ModelConfig.preset("tiny")
  args = argparse.Namespace(prompts=2, group=2, prompt_len=6, completion_len=10)
  fwd = common.forward_flops(cfg, 4, 16)
  full = lambda **kw: RLConfig(share_prompt=False, **kw)
  assert update.update_flops(cfg, full(beta=0.0), args) == 3 * fwd
  assert update.update_flops(cfg, full(beta=0.1), args) == 4 * fwd
  assert update.update_flops(cfg, full(beta=0.1, num_iterations=2), args) == 8 * fwd
  # Shared prompts: 2 prompts of 6 tokens run once, 4 rows of 10 completion tokens after them.
  shared = common.shared_prompt_flops(cfg, 2, 2, 6, 10)
  assert shared == fwd - common.forward_flops(cfg, 4, 6) + common.forward_flops(cfg, 2, 6)
  assert update.update_flops(cfg, RLConfig(beta=0.0), args) == 3 * shared < 3 * fwd
  # Two micro-batches of one row per prompt: nothing is shared.
  assert update.update_flops(cfg, RLConfig(beta=0.0, num_micro_batches=2), args) == 3 * fwd


def test_largest_vocab_array():
  meta = lambda name: f' metadata={{op_name="jit(f)/{name}"}}'
  hlo = "\n".join([
      "%a = f32[32,8,1024]{2,1,0} fusion(%x)" + meta("checkpoint/jit(log_softmax)/sub"),
      "%b = f32[4,1024]{1,0} dot(%x)" + meta("BTD,DV->BTV/dot_general"),
      "%c = f32[4,4,3072,1024]{3,2,1,0} dot(%x)" + meta("layers/moe/ECD,EDF->ECF/dot_general"),
      "%d = bf16[64,64,1024]{2,1,0} convert(%x)" + meta("jit(log_softmax)/sub"),
      "%e = f32[64,64,1024]{2,1,0} add(%x, %y)"])
  assert update.largest_vocab_array(hlo, 1024) == 32 * 8 * 1024
  assert update.largest_vocab_array(hlo, 77) == 0


def test_append_row_keeps_each_table_in_its_section(tmp_path):
  path = str(tmp_path / "b.md")
  with open(path, "w") as f:
    f.write("# Benchmarks\n\n### A\n\n| date (UTC) | machine | x |\n|---|---|---|\n| d | m | 1 |\n")
  common.append_row("B", ["y"], [5], path)
  common.append_row("A", ["x"], [2], path)
  common.append_row("B", ["y"], [6], path)
  lines = open(path).read().splitlines()
  a, b = lines.index("### A"), lines.index("### B")
  assert [l.rsplit("|", 2)[-2].strip() for l in lines[a + 4:b] if l.startswith("|")] == ["1", "2"]
  assert [l.rsplit("|", 2)[-2].strip() for l in lines[b + 4:] if l.startswith("|")] == ["5", "6"]


def test_sweep_rejects_unknown_flag():
  args = _args(update, TINY + ["--sweep=nonsense=1,2"])
  with pytest.raises(ValueError, match="--sweep"):
    list(common.sweep(args, lambda a: {}, ("x",)))


def test_sweep_sets_each_value():
  args = _args(update, TINY + ["--sweep=experts=4,8"])
  seen = [(a.experts, r) for a, r in common.sweep(args, lambda a: {"e2": 2 * a.experts}, ())]
  assert seen == [(4, {"experts": 4, "e2": 8}), (8, {"experts": 8, "e2": 16})]


def _json_line(capsys):
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert len(lines) == 1
  return json.loads(lines[0])


@pytest.mark.slow
def test_update_bench_prints_json(capsys):
  update.main(_args(update, TINY + ["--runs=2"]))
  out = _json_line(capsys)
  for key in ("update_s", "mfu", "model_gflop", "compiled_peak_mb", "rss_peak_mb"):
    assert out[key] > 0
  assert out["full_logits_elems"] == 4 * 16 * 1024
  assert 0 < out["largest_vocab_f32_elems"] < out["full_logits_elems"]
  assert out["full_logits_live"] is False


@pytest.mark.slow
def test_step_bench_prints_json(capsys):
  step.main(_args(step, TINY + ["--runs=5"]))
  out = _json_line(capsys)
  for key in ("step_s", "rollout_s", "update_s", "reward_s", "rollout_tokens_per_s", "mfu"):
    assert out[key] > 0
  # Every step is at least its rollout and at least its update, so the medians keep that order
  # (a median of sums need not exceed the sum of the medians: that flaked under load).
  assert out["step_s"] >= max(out["rollout_s"], out["update_s"])


def test_step_bench_needs_five_runs():
  with pytest.raises(ValueError, match="--runs=2"):
    step.measure(_args(step, TINY + ["--runs=2"]))


@pytest.mark.slow
def test_rollout_bench_prints_json(capsys):
  rollout.main(_args(rollout, TINY[:10] + ["--runs=1"]))
  out = _json_line(capsys)
  assert out["tokens_per_s"] > 0 and out["generate_ms"] > 0
  assert {"decode_step_ms", "decode_step_cpu_ms", "prefill_ms"} <= set(out)
