"""grain pipelines: batch layout, masks, determinism, resume from saved state, sharding."""

import json
import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from corpo_jax.data import pipeline, tasks, tokenizer

TOK = tokenizer.bundled()
TASKS = [tasks.get("arithmetic", max_digits=2), tasks.get("verify")]


def _rl(seed=0, shard=grain.sharding.NoSharding(), batch_size=4):
  return pipeline.rl_prompts(TASKS, TOK, batch_size=batch_size, seed=seed, buckets=(16, 48, 64),
                             shard_options=shard)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rl_batch_layout_and_examples():
  batch = next(iter(_rl()))
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape[0] == 4
  assert batch["tokens"].shape[1] in (16, 48, 64)
  assert batch["task_id"].shape == batch["index"].shape == (4,)
  exs = pipeline.examples(batch, TASKS, "train")
  for row, mask, ex in zip(batch["tokens"], batch["token_mask"], exs):
    n = len(TOK.prompt_ids(ex.prompt))
    assert mask.sum() == n and mask[-n:].all()                      # left padded
    assert (row[:-n] == TOK.pad_id).all() and row[-n] == TOK.bos_id
    assert TOK.decode(row) == ex.prompt + "\n"
  # Bucket: the smallest of (16, 48, 64) holding the longest prompt in the batch.
  longest = batch["token_mask"].sum(1).max()
  assert batch["tokens"].shape[1] == min(b for b in (16, 48, 64) if b >= longest)


def test_left_pad_prompts_pads_like_the_rl_loader():
  tokens, mask = pipeline.left_pad_prompts([[2, 7, 8], [2, 9]], pad_id=0, buckets=(4, 8))
  np.testing.assert_array_equal(tokens, [[0, 2, 7, 8], [0, 0, 2, 9]])
  np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, True, True]])
  tokens, mask = pipeline.left_pad_prompts([[2] * 5], pad_id=0, buckets=(4, 8))
  assert tokens.shape == (1, 8) and tokens.dtype == np.int32 and mask.sum() == 5 and mask[0, 3:].all()
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    pipeline.left_pad_prompts([[2] * 9], pad_id=0, buckets=(4, 8))


def test_rl_shuffle_depends_on_seed_only():
  _assert_same(_take(iter(_rl(seed=1)), 3), _take(iter(_rl(seed=1)), 3))
  a, b = next(iter(_rl(seed=1))), next(iter(_rl(seed=2)))
  assert not np.array_equal(a["index"], b["index"])


@pytest.mark.parametrize("make", [_rl, lambda: pipeline.sft_sequences(
    pipeline.TaskTraces(TASKS[0]), TOK, batch_size=3, seed=5, buckets=(64, 128),
    shard_options=grain.sharding.NoSharding())])
def test_restored_iterator_continues_exactly(make):
  it = iter(make())
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  restored = iter(make())
  restored.set_state(state)
  _assert_same(_take(restored, 4), expected)


def test_iterator_checkpoint_with_orbax(tmp_path):
  it = iter(_rl())
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = iter(_rl())
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mngr:
    restored = mngr.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  _assert_same(_take(restored, 3), expected)


def test_two_processes_see_disjoint_shards():
  seen = []
  for index in (0, 1):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    batches = _take(iter(_rl(shard=shard, batch_size=8)), 6)
    seen.append({(int(t), int(i)) for b in batches for t, i in zip(b["task_id"], b["index"])})
    assert len(seen[-1]) == 48
  assert not seen[0] & seen[1]


def test_sft_masks_and_labels():
  ex = TASKS[0].example("train", 0)
  row = pipeline.sft_example(TOK, ex.prompt, ex.trace, ex.answer)
  tokens = row["tokens"]
  assert TOK.decode(tokens) == ex.prompt + "\n" + ex.completion()
  assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
  think = int(np.flatnonzero(tokens == TOK.think_start_id)[0])
  close = int(np.flatnonzero(tokens == TOK.think_end_id)[0])
  np.testing.assert_array_equal(np.flatnonzero(row["trace_mask"]), np.arange(think + 1, close + 1))
  np.testing.assert_array_equal(np.flatnonzero(row["answer_mask"]),
                                [think] + list(range(close + 1, len(tokens))))
  assert TOK.decode(tokens[row["answer_mask"]]) == "<think>\n" + ex.answer
  # One numbered-step label per trace line, on the line's first token.
  labelled = np.flatnonzero(row["step_labels"])
  assert len(labelled) == len(ex.trace.splitlines()) and set(row["step_labels"][labelled]) == {1}
  assert all(TOK.decode([tokens[i]]) == str(k) for k, i in enumerate(labelled, 1))


def test_sft_reads_distill_output(tmp_path):
  path = tmp_path / "traces.jsonl"
  path.write_text(json.dumps({"prompt": "Compute 1 + 2.", "thinking_trace": "- 1 + 2 = 3",
                              "final_output": "3", "parsed_steps": ["- 1 + 2 = 3"],
                              "num_steps": 1}) + "\n")
  batch = next(iter(pipeline.sft_sequences(pipeline.read_traces(str(path)), TOK, batch_size=2,
                                           seed=0, buckets=(32, 64),
                                           shard_options=grain.sharding.NoSharding())))
  assert batch["tokens"].shape == (2, 32)
  n = int(batch["token_mask"][0].sum())
  assert not batch["token_mask"][0, n:].any() and (batch["tokens"][0, n:] == TOK.pad_id).all()
  assert TOK.decode(batch["tokens"][0]) == "Compute 1 + 2.\n<think>\n- 1 + 2 = 3\n</think>\n3"
  assert (batch["step_labels"][0] == 4).sum() == 1


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_trace_share_keeps_that_share_of_traces(share):
  source = pipeline.SftSource(pipeline.TaskTraces(TASKS[0]), TOK, trace_share=share)
  kept = [source.keeps_trace(i) for i in range(200)]
  for start in (0, 37, 150):  # any run of rows holds the share to within one row
    assert abs(sum(kept[start:start + 50]) - 50 * share) <= 1
  texts = [TOK.decode(source[i]["tokens"]) for i in range(20)]
  assert [("\n<think>\n\n</think>\n" not in t) for t in texts] == kept[:20]


def test_trace_share_out_of_range_is_an_error():
  with pytest.raises(ValueError, match=r"trace_share=1.5 must be in \[0, 1\]"):
    pipeline.SftSource([], TOK, trace_share=1.5)


@pytest.mark.parametrize("line,message", [
    ("{bad", "traces.jsonl:1: invalid JSON"),
    ('{"prompt": "p", "final_output": "3"}', "traces.jsonl:1: need string fields"),
])
def test_read_traces_errors(tmp_path, line, message):
  (tmp_path / "traces.jsonl").write_text(line + "\n")
  with pytest.raises(ValueError, match=message):
    pipeline.read_traces(str(tmp_path / "traces.jsonl"))


def test_too_long_prompt_names_the_fix():
  loader = pipeline.rl_prompts(TASKS, TOK, batch_size=2, seed=0, buckets=(8,),
                               shard_options=grain.sharding.NoSharding())
  with pytest.raises(ValueError, match="more than max_prompt_len=8; shorten it"):
    next(iter(loader))


def test_sources_pickle_for_grain_workers():
  source = pipeline.PromptSource(TASKS, TOK, "train")
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source)
  for i in (0, 1, 17):
    _assert_same([clone[i]], [source[i]])


def test_sft_without_trace_is_a_plain_answer():
  """trace_share=0 (the no-thinking baseline): an empty think block, the same answer targets."""
  ex = TASKS[1].example("train", 0)
  source = pipeline.SftSource(pipeline.TaskTraces(TASKS[1]), TOK, trace_share=0.0)
  row = source[0]
  tokens = row["tokens"]
  assert TOK.decode(tokens) == f"{ex.prompt}\n<think>\n\n</think>\n{ex.answer}"
  assert TOK.decode(tokens[row["trace_mask"]]) == "\n\n</think>"
  assert TOK.decode(tokens[row["answer_mask"]]) == "<think>\n" + ex.answer
  assert not row["step_labels"].any()
  assert repr(source).endswith(", trace_share=0.0)") and "trace_share" not in repr(
      pipeline.SftSource(pipeline.TaskTraces(TASKS[1]), TOK))
  # The same rows with the trace differ only inside the think block.
  full = pipeline.SftSource(pipeline.TaskTraces(TASKS[1]), TOK)[0]
  np.testing.assert_array_equal(full["tokens"][full["answer_mask"]], tokens[row["answer_mask"]])
