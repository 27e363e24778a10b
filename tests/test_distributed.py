"""Multi-process data plumbing on one process: per-process rows of global batches reassemble the
global batch, padding agrees with the loaders', host <-> global round trips, start-up flags.

The runs with several processes are in tests/train/test_multiprocess.py.
"""

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from corpo_jax import distributed, sharding
from corpo_jax.data import pipeline, tasks, tokenizer

TOK = tokenizer.bundled()
TASKS = [tasks.get("arithmetic", max_digits=2), tasks.get("verify")]
BUCKETS = (16, 48, 64)


def _rl(batch_rows=None, batch_size=6):
  shard = None if batch_rows is not None else grain.sharding.NoSharding()
  return pipeline.rl_prompts(TASKS, TOK, batch_size=batch_size, seed=3, buckets=BUCKETS,
                             shard_options=shard, batch_rows=batch_rows)


def _take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_process_rows_of_every_global_batch_reassemble_it():
  whole = _take(_rl(), 4)
  assert [b["index"].tolist() for b in _take(_rl(batch_rows=range(6)), 4)] == [
      b["index"].tolist() for b in whole]  # all rows: the unsharded stream itself
  parts = [_take(_rl(batch_rows=rows), 4) for rows in ((0, 1, 2), (3, 4), (5,))]
  for k, batch in enumerate(whole):
    for key in ("index", "task_id"):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), batch[key])
  # Non-contiguous rows (a device order that interleaves processes) pick exactly those rows.
  odd = _take(_rl(batch_rows=(1, 3, 5)), 4)
  for k, batch in enumerate(whole):
    np.testing.assert_array_equal(odd[k]["index"], batch["index"][1::2])


def test_rows_loader_resumes_from_saved_state():
  it = iter(_rl(batch_rows=(2, 4)))
  next(it)
  state = it.get_state()
  expected = [next(it)["index"] for _ in range(3)]
  restored = iter(_rl(batch_rows=(2, 4)))
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(restored)["index"], want)
  with pytest.raises(ValueError, match="Sampler in checkpoint does not match"):
    iter(_rl(batch_rows=(1, 4))).set_state(state)  # another process layout: refused


@pytest.mark.parametrize("left", [True, False])
def test_pad_to_equals_loading_with_a_wider_bucket(left):
  if left:
    make = lambda buckets: pipeline.rl_prompts(TASKS, TOK, batch_size=4, seed=0, buckets=buckets,
                                               shard_options=grain.sharding.NoSharding())
  else:
    make = lambda buckets: pipeline.sft_sequences(
        pipeline.TaskTraces(TASKS[0]), TOK, batch_size=4, seed=0, buckets=buckets,
        shard_options=grain.sharding.NoSharding())
  narrow = next(iter(make((64, 128, 256))))
  wide = next(iter(make((256,))))
  assert narrow["tokens"].shape[1] < 256
  padded = pipeline.pad_to(narrow, 256, TOK.pad_id, left=left)
  assert padded.keys() == wide.keys()
  for key in wide:
    np.testing.assert_array_equal(padded[key], wide[key], err_msg=key)


def test_to_global_and_fetch_round_trip_on_the_mesh():
  mesh = sharding.make_mesh((4, 2, 1, 1))
  rows_sh = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  batch = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
           "task_id": np.arange(8, dtype=np.int32)}
  np.testing.assert_array_equal(distributed.process_rows(rows_sh, 8), np.arange(8))
  out = distributed.to_global(batch, rows_sh, 8)
  assert out["tokens"].sharding == rows_sh and len(out["tokens"].addressable_shards) == 8
  back = distributed.fetch(out)
  for key in batch:
    np.testing.assert_array_equal(back[key], batch[key])
  assert distributed.max_over_processes(7) == 7


@pytest.mark.parametrize("flags", [("localhost:1234", None, None), (None, 2, 0),
                                   ("localhost:1234", 2, None)])
def test_partial_coordinator_flags_are_rejected(flags):
  with pytest.raises(ValueError, match="give all three"):
    distributed.initialize(*flags, heartbeat_timeout_s=10)


def test_process_id_out_of_range_is_rejected():
  with pytest.raises(ValueError, match="--process_id=2 must be in"):
    distributed.initialize("localhost:1234", 2, 2, heartbeat_timeout_s=10)


def test_no_flags_off_tpu_starts_nothing():
  assert not distributed.on_cloud_tpu()
  assert distributed.initialize(None, None, None, heartbeat_timeout_s=10) is False
  assert jax.process_count() == 1
