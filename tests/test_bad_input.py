"""Bad input fails with a ValueError naming the file:line or config field and the fix, before
anything saved is touched (the catalogue is docs/reliability.md)."""

import json
import os
import re
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from configs import corpo
from configs import grpo as grpo_config
from corpo_jax.data import pipeline, tasks, tokenizer
from corpo_jax.model import ModelConfig
from corpo_jax.train import loop
from corpo_jax.train import setup as setup_lib

TOK = tokenizer.bundled()
GOOD = {"prompt": "What is 2 + 2?", "answer": "4"}
CODE = {"name": "f", "prompt": "p", "solution": "def f(): pass", "function": "f",
        "tests": [{"args": [], "expected": None}]}
TRACE = {"prompt": "p", "thinking_trace": "t", "final_output": "4"}


def _read(kind, path):
  if kind == "jsonl":
    return tasks.get("jsonl", path=path)
  if kind == "code":
    return tasks.get("code", path=path)
  return pipeline.read_traces(path)


@pytest.mark.parametrize("kind,good,missing", [
    ("jsonl", GOOD, {"prompt": "p"}),
    ("code", CODE, {**CODE, "tests": "assert True"}),
    ("traces", TRACE, {"prompt": "p", "final_output": "4"}),
])
def test_malformed_lines_missing_fields_and_empty_files_name_file_and_line(tmp_path, kind, good,
                                                                            missing):
  path = tmp_path / "data.jsonl"
  path.write_text(f"{json.dumps(good)}\n\n{{\"prompt\": \"p\",\n")
  with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON .* each line must be one"):
    _read(kind, str(path))
  path.write_text(f"{json.dumps(good)}\n{json.dumps(missing)}\n")
  with pytest.raises(ValueError, match=r"data\.jsonl:2: (need|\"tests\" must be)"):
    _read(kind, str(path))
  path.write_bytes(json.dumps(good).encode() + b"\n\xff\xfe{}\n")
  with pytest.raises(ValueError, match=r"data\.jsonl:2: not UTF-8 .*save the file as UTF-8"):
    _read(kind, str(path))
  path.write_text("\n  \n")
  with pytest.raises(ValueError, match="data.jsonl' has no rows"):
    _read(kind, str(path))
  with pytest.raises(ValueError, match="does not exist"):
    _read(kind, str(tmp_path / "missing.jsonl"))


def test_an_empty_split_names_the_fix(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(GOOD) + "\n")
  task = tasks.get("jsonl", path=str(path), eval_fraction=0.01)
  assert task.size("train") == 1
  with pytest.raises(ValueError, match="has no eval rows; pass eval_path or change eval_fraction"):
    task.size("eval")


def _long_prompt_loader(tmp_path, long_prompts):
  path = tmp_path / "t.jsonl"
  rows = [GOOD, {"prompt": "Add up " + " + ".join(["1"] * 40) + ".", "answer": "40"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  task = tasks.get("jsonl", path=str(path), eval_path=str(path))
  return pipeline.rl_prompts([task], TOK, batch_size=2, seed=0, max_prompt_len=24,
                             long_prompts=long_prompts, buckets=(16, 32),
                             shard_options=grain.sharding.NoSharding())


def test_too_long_prompt_is_rejected_naming_file_and_line(tmp_path):
  with pytest.raises(ValueError, match=r"The prompt of .*t\.jsonl:2 has \d+ tokens, more than "
                     r"max_prompt_len=24; .*long_prompts='truncate'"):
    next(iter(_long_prompt_loader(tmp_path, "reject")))


def test_too_long_prompt_is_truncated_and_counted(tmp_path):
  batch = next(iter(_long_prompt_loader(tmp_path, "truncate")))
  long_row = int(np.argmax(batch["truncated"]))
  assert batch["truncated"].tolist().count(True) == 1
  tokens = batch["tokens"][long_row][batch["token_mask"][long_row]]
  full = TOK.prompt_ids("Add up " + " + ".join(["1"] * 40) + ".")
  assert len(tokens) == 24 and tokens[0] == TOK.bos_id
  assert tokens[1:].tolist() == full[-23:]  # the prompt's end (and its newline) is kept


def test_bad_prompt_limits_are_rejected():
  config = grpo_config.get_config("smoke")
  config.rl.long_prompts = "drop"
  with pytest.raises(ValueError, match=r"config\.rl\.long_prompts='drop' is not one of"):
    setup_lib.check_config(config)
  with pytest.raises(ValueError, match="max_prompt_len=2048 is longer than the largest bucket"):
    pipeline.rl_prompts([tasks.get("verify")], TOK, batch_size=1, seed=0, max_prompt_len=2048)


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 512, r"The tokenizer has 833 tokens but model\.vocab_size=512; set "
                        r"--config\.model\.vocab_size=833"),
    ("think_start_id", 7, r"model\.think_start_id=7 but the tokenizer's id is 4"),
    ("pad_id", 6, r"model\.pad_id=6 but the tokenizer's id is 0"),
])
def test_tokenizer_model_mismatch_names_the_field(field, value, message):
  """The trainer takes the special ids from its tokenizer; a config that sets one (an old
  config.json, a hand-written config) must agree with it."""
  config = grpo_config.get_config("smoke")
  assert setup_lib.model_config(config, TOK).pad_id == TOK.pad_id and "pad_id" not in config.model
  config.model[field] = value
  with pytest.raises(ValueError, match=message):
    setup_lib.model_config(config, TOK)


def test_workdir_of_another_model_is_refused_naming_fields_and_kept(tmp_path):
  config = grpo_config.get_config("smoke")
  config.workdir = str(tmp_path)
  os.makedirs(tmp_path / "checkpoints" / "sft")
  saved = config.to_json_best_effort(indent=2)
  (tmp_path / "config.json").write_text(saved)
  # Same parameter shapes: resuming is allowed (here: only the MoE capacity changes).
  config.model.capacity_factor = 3.0
  setup_lib.check_workdir_model(str(tmp_path), ModelConfig.from_dict(config.model))
  config.model.num_layers += 1
  config.model.d_ff = 64
  with pytest.raises(ValueError, match=r"are of a model with model\.num_layers=1 \(this run: 2\), "
                     r"model\.d_ff=128 \(this run: 64\), model\.capacity_factor=2\.0 \(this run: 3\.0\); "
                     r"they cannot be restored"):
    setup_lib.setup(config)
  assert (tmp_path / "config.json").read_text() == saved  # the old run's record is intact


def test_evaluate_cli_names_a_missing_run_stage_or_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="No config.json in .*--config.workdir of a run"):
    loop.evaluate_workdir(str(tmp_path))
  config = grpo_config.get_config("smoke")
  config.workdir = str(tmp_path)
  (tmp_path / "config.json").write_text(config.to_json())
  with pytest.raises(ValueError, match=r"--stage='rl2' is not a stage of this run; its stages "
                                       r"are \('sft', 'rl', 'specialize'\)"):
    loop.evaluate_workdir(str(tmp_path), stage="rl2")
  with pytest.raises(ValueError, match=r"No checkpoint under .*/checkpoints; nothing"):
    loop.evaluate_workdir(str(tmp_path))
  (tmp_path / "checkpoints" / "rl").mkdir(parents=True)  # a stage that never saved
  with pytest.raises(ValueError, match=r"No checkpoint under .*/checkpoints/rl; nothing"):
    loop.evaluate_workdir(str(tmp_path), stage="rl")
  with pytest.raises(ValueError, match="--num_prompts=0: evaluate at least one problem"):
    loop.evaluate_workdir(str(tmp_path), num_prompts=0)


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path):
  """mixtral_8x7b (46.7B parameters) on this CPU: the estimate is in the message, and the
  refusal comes from shapes alone (the process stays far below the model's size)."""
  config = corpo.get_config(f"model=mixtral_8x7b,workdir={tmp_path}")
  with open("/proc/self/clear_refs", "w") as f:  # resets this process's peak RSS (VmHWM)
    f.write("5")
  with pytest.raises(ValueError, match=r"params 174\.0 GiB \+ optimizer state 348\.0 GiB \+ "
                                       r"reference 174\.0 GiB = 695\.9 GiB .* but has"):
    loop.run(config)
  peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
  assert peak_kib < 8 * 2**20  # under 8 GiB: nothing of the 187 GB model was allocated


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,message", [
    # Non-finite numbers pass every range check (nan < 0 is False): named before any work.
    ("sft.learning_rate", NAN, r"config\.sft\.learning_rate=nan is not a finite number"),
    ("rl.learning_rate", INF, r"config\.rl\.learning_rate=inf is not a finite number"),
    ("rl.temperature", NAN, r"config\.rl\.temperature=nan is not a finite number"),
    ("rl.tau", NAN, r"config\.rl\.tau=nan is not a finite number"),
    ("rl.beta", -INF, r"config\.rl\.beta=-inf is not a finite number"),
    ("rl.rewards", (("exact_match", NAN),), r"config\.rl\.rewards\[0\]\[1\]=nan is not a finite"),
    ("eval.temperature", NAN, r"config\.eval\.temperature=nan is not a finite number"),
    ("tasks.code.wall_s", INF, r"config\.tasks\.code\.wall_s=inf is not a finite number"),
    # Out of range.
    ("rl.checkpoint_every", 0, r"config\.rl\.checkpoint_every=0 must be >= 1 \(steps between"),
    ("sft.checkpoint_every", -2, r"config\.sft\.checkpoint_every=-2 must be >= 1"),
    ("checkpoint.max_to_keep", 0, r"config\.checkpoint\.max_to_keep=0 must be >= 1"),
    ("rl.prompts_per_step", 0, r"config\.rl\.prompts_per_step=0 must be >= 1"),
    ("sft.batch_size", 0, r"config\.sft\.batch_size=0 must be >= 1"),
    ("sft.batch_size", -8, r"config\.sft\.batch_size=-8 must be >= 1"),
    ("rl.top_p", 0.0, r"config\.rl\.top_p=0\.0 must be in \(0, 1\] \(1\.0 is off\)"),
    ("rl.top_p", 1.5, r"config\.rl\.top_p=1\.5 must be in \(0, 1\]"),
    ("rl.top_k", -1, r"config\.rl\.top_k=-1 must be >= 0 \(0 is off\)"),
    ("rl.temperature", -0.5, r"config\.rl\.temperature=-0\.5 must be >= 0 \(0 is greedy\)"),
    ("rl.max_new_tokens", 0, r"config\.rl\.max_new_tokens=0 must be >= 1"),
    ("rl.max_thinking_tokens", -1, r"config\.rl\.max_thinking_tokens=-1 must be >= 0"),
    ("rl.max_prompt_len", 1, r"config\.rl\.max_prompt_len=1 must be >= 2"),
    ("rl.eval_every", -1, r"config\.rl\.eval_every=-1 must be >= 0"),
    ("rl.samples_every", -1, r"config\.rl\.samples_every=-1 must be >= 0"),
    ("sft.trace_share", 1.5, r"config\.sft\.trace_share=1\.5 must be in \[0, 1\]"),
    ("sft.step_loss_weight", -0.1, r"config\.sft\.step_loss_weight=-0\.1 must be >= 0"),
    ("eval.num_prompts", 0, r"config\.eval\.num_prompts=0 must be >= 1 \(problems per task\)"),
    ("eval.num_samples", 0, r"config\.eval\.num_samples=0 must be >= 1"),
    ("eval.prompts_per_batch", 0, r"config\.eval\.prompts_per_batch=0 must be >= 1"),
    ("eval.max_new_tokens", 0, r"config\.eval\.max_new_tokens=0 must be >= 1"),
    ("rl.warmup_steps", -1, r"config\.rl\.warmup_steps=-1 must be >= 0"),  # RLConfig's own
])
def test_every_bad_number_is_refused_at_start_naming_the_field(field, value, message):
  config = grpo_config.get_config("smoke")
  section, _, name = field.rpartition(".")
  target = config
  for part in section.split("."):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=message):
    setup_lib.check_config(config)


def test_rl_config_refuses_non_finite_numbers():
  from corpo_jax.rl.config import RLConfig
  for field in ("learning_rate", "tau", "beta", "temperature", "eps", "weight_decay", "b1"):
    with pytest.raises(ValueError, match=rf"rl\.{field}=nan must be a finite number"):
      RLConfig(**{field: NAN})


def test_a_nan_learning_rate_exits_2_before_any_work(tmp_path):
  """Was: an sft run with lr nan finished "successfully" with all-NaN parameters marked done."""
  out = subprocess.run(
      [sys.executable, "-m", "corpo_jax.main", "--config=configs/grpo.py:smoke",
       f"--config.workdir={tmp_path / 'run'}", "--config.sft.learning_rate=nan"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True)
  assert out.returncode == 2, out.stderr
  assert ("corpo_jax: error: config.sft.learning_rate=nan is not a finite number; give it a "
          "finite value.") in out.stderr
  assert not (tmp_path / "run").exists()  # nothing made: no workdir, no lock, no config.json


def _trace_file(tmp_path, rows):
  path = tmp_path / "traces.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_a_10_mb_trace_line_fails_at_load_naming_file_and_line(tmp_path):
  huge = {**TRACE, "thinking_trace": "add 1 and 2 to get 3. " * 500_000}  # 11 MB
  path = _trace_file(tmp_path, [TRACE, TRACE, huge, TRACE])
  t0 = time.perf_counter()
  rows = pipeline.read_traces(path)
  with pytest.raises(ValueError, match=rf"The SFT row {re.escape(path)}:3 has 11000001 bytes \(at "
                     r"least 687500 tokens\), more than the largest bucket's 1024; shorten it or "
                     r"remove it from the file\."):
    pipeline.sft_sequences(rows, TOK, batch_size=2, seed=0,
                           shard_options=grain.sharding.NoSharding())
  assert time.perf_counter() - t0 < 10  # not tokenized (that takes ~10 s here)


def test_a_trace_row_over_the_largest_bucket_fails_at_load_naming_file_and_line(tmp_path):
  long = {**TRACE, "thinking_trace": " ".join(f"{n} + 1 = {n + 1}" for n in range(300))}
  path = _trace_file(tmp_path, [TRACE, long])
  with pytest.raises(ValueError, match=rf"The SFT row {re.escape(path)}:2 has \d{{4}} tokens, more "
                     r"than the largest bucket's 1024"):
    pipeline.sft_sequences(pipeline.read_traces(path), TOK, batch_size=2, seed=0,
                           shard_options=grain.sharding.NoSharding())
  # The same row with trace_share 0 (no trace kept) fits.
  pipeline.sft_sequences(pipeline.read_traces(path), TOK, batch_size=2, seed=0, trace_share=0.0,
                         shard_options=grain.sharding.NoSharding())
