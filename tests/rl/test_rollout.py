"""rl/rollout.py: which groups are informative, dynamic sampling's refills and how groups of
several prompt batches are put together; and, through the trainer, that the update sees only
mixed groups and that a preempted run resumes to the same metrics."""

import zlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo as grpo_config
from corpo_jax import model, sampling
from corpo_jax.data import text as text_lib
from corpo_jax.data.tokenizer import bundled
from corpo_jax.rl import rewards as rewards_lib
from corpo_jax.rl import rollout
from corpo_jax.rl import step as rl_step
from corpo_jax.train import checkpoint, loop
from corpo_jax.train.metrics import read_jsonl

G, T, L, A, PAD = 2, 3, 2, 2, 9


def test_informative_groups_are_finite_and_not_all_equal():
  R = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.5, 1.0],
                [np.nan, 1.0, 0.0], [np.inf, np.inf, np.inf]])
  np.testing.assert_array_equal(rollout.informative(R), [False, True, False, True, False, False])


def _groups(rewards_BG, width, tag):
  """A fake batch of B prompts of `width` tokens: every value encodes (tag, row), so the
  assembled rows can be traced back to their source."""
  B = len(rewards_BG)
  rows = np.arange(B * G)
  prompt = 100 * tag + np.arange(B)[:, None] + np.zeros((1, width), np.int32)
  code = 100 * tag + rows
  return rollout.Groups(
      prompt_tokens=jnp.asarray(prompt, jnp.int32), prompt_mask=jnp.ones((B, width), bool),
      rollout=sampling.Rollout(
          tokens=jnp.asarray(np.repeat(code[:, None], T, 1), jnp.int32),
          mask=jnp.ones((B * G, T), bool), logprobs=jnp.asarray(-code[:, None] * np.ones(T)),
          lengths=jnp.full((B * G,), T), truncated=jnp.asarray(rows % 2 == 0),
          experts=jnp.asarray(np.broadcast_to(code[None, :, None, None], (L, B * G, width + T, A)),
                              jnp.int32)),
      rewards=np.asarray(rewards_BG, np.float32), texts=[f"{tag}:{r}" for r in rows],
      examples=[(tag, r) for r in rows], components={"exact_match": code.astype(np.float32)},
      prompts={"truncated": np.zeros(B, bool), "think_tags": np.ones(B, np.int32)},
      errors={"exact_match": tag}, num_failed=tag, tokens=B * G * T)


MIXED, SAME = [0.0, 1.0], [1.0, 1.0]


def test_collect_refills_with_mixed_groups_of_later_batches():
  batches = {0: _groups([MIXED, SAME, MIXED, SAME], width=3, tag=1),
             1: _groups([SAME, MIXED, MIXED, MIXED], width=5, tag=2)}
  drawn = []
  out, stats = rollout.collect(lambda t: drawn.append(t) or batches[t], 4, 4, PAD)
  assert drawn == [0, 1]  # stops as soon as 4 mixed groups are in hand
  assert stats == {"dynamic/batches": 2, "dynamic/informative_frac": 5 / 8,
                   "dynamic/filled_uninformative": 0}
  np.testing.assert_array_equal(out.rewards, [MIXED] * 4)
  # Batch 1's groups 0 and 2, then batch 2's groups 1 and 2; the narrower prompts left-padded.
  np.testing.assert_array_equal(out.prompt_tokens, [[PAD, PAD, 100, 100, 100],
                                                    [PAD, PAD, 102, 102, 102],
                                                    [201] * 5, [202] * 5])
  np.testing.assert_array_equal(out.prompt_mask[:, :2], [[False] * 2] * 2 + [[True] * 2] * 2)
  source = [100, 101, 104, 105, 202, 203, 204, 205]  # 100 * tag + row
  np.testing.assert_array_equal(out.rollout.tokens[:, 0], source)
  np.testing.assert_array_equal(out.rollout.logprobs[:, 0], -np.asarray(source))
  np.testing.assert_array_equal(out.rollout.truncated, np.asarray(source) % 2 == 0)
  assert out.rollout.experts.shape == (L, 8, 5 + T, A)
  np.testing.assert_array_equal(out.rollout.experts[0, :, -1, 0], source)
  np.testing.assert_array_equal(out.rollout.experts[0, :4, :2, 0], 0)  # under the prompt padding
  assert out.texts == [f"{s // 100}:{s % 100}" for s in source]
  np.testing.assert_array_equal(out.components["exact_match"], source)
  assert (out.errors, out.num_failed, out.tokens) == ({"exact_match": 3}, 3, 48)
  batch = rl_step.make_batch(out.prompt_tokens, out.prompt_mask, out.rollout, out.rewards)
  assert batch.tokens.shape == (8, 5 + T) and batch.prompt_len == 5


def test_collect_fills_with_uninformative_groups_when_the_batches_run_out():
  batches = {0: _groups([SAME, MIXED], width=3, tag=1), 1: _groups([SAME, SAME], width=3, tag=2)}
  out, stats = rollout.collect(lambda t: batches[t], 2, 2, PAD)
  assert stats == {"dynamic/batches": 2, "dynamic/informative_frac": 1 / 4,
                   "dynamic/filled_uninformative": 1}
  np.testing.assert_array_equal(out.rollout.tokens[:, 0], [100, 101, 102, 103])  # batch 1's own


def test_one_batch_is_returned_as_it_is():
  first = _groups([SAME, MIXED], width=3, tag=1)
  out, stats = rollout.collect(lambda t: first, 2, 1, PAD)
  assert out is first and stats["dynamic/batches"] == 1


@pytest.mark.slow
def test_dynamic_sampling_trains_on_mixed_groups_and_resumes_exactly(tmp_path):
  """The smoke config's RL stage with a reward that is constant on problems of even index and
  differs inside the group on odd ones: every group the update sees is mixed, the batch is
  refilled to B prompts, and a run preempted after its step-2 checkpoint resumes to the
  uninterrupted run's metrics."""
  compute = rewards_lib.compute

  def half_homogeneous(spec, texts, examples, tasks):
    scores = compute(spec, texts, examples, tasks)
    odd = np.asarray([zlib.crc32(ex.key.encode()) % 2 for ex in examples])
    position = np.arange(len(texts)) % 4  # the smoke config's G = 4
    scores.total_N[:] = np.where(odd == 1, position / 3.0, 0.5)
    return scores

  seen = []
  make_batch = rl_step.make_batch

  def recording(prompts, mask, rollout_, rewards_BG):
    seen.append(np.asarray(rewards_BG))
    return make_batch(prompts, mask, rollout_, rewards_BG)

  def config(workdir):
    c = grpo_config.get_config("smoke")
    c.workdir = str(workdir)
    c.stages = ("rl",)
    c.rl.update(steps=4, checkpoint_every=2, dynamic_sampling=True,
                dynamic_sampling_max_batches=6)
    c.eval.tasks = ()
    c.log.progress = False
    return c

  with mock.patch.object(rollout.rewards_lib, "compute", half_homogeneous), \
       mock.patch.object(rl_step, "make_batch", recording):
    loop.run(config(tmp_path / "ref"))
    reference = read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))
    assert len(seen) == 4 and all(r.shape == (2, 4) for r in seen)
    assert all(rollout.informative(r).all() for r in seen)  # only mixed groups trained on
    assert max(r["dynamic/batches"] for r in reference) >= 2  # refilled at least once
    assert all(r["dynamic/filled_uninformative"] == 0 for r in reference)

    preempt_at = lambda self, step: step == 2 and not (tmp_path / "resumed").exists()
    with mock.patch.object(checkpoint.Checkpointer, "preempted", preempt_at):
      with pytest.raises(loop.Preempted):
        loop.run(config(tmp_path / "killed"))
    (tmp_path / "resumed").touch()
    loop.run(config(tmp_path / "killed"))
  wall = ("time", "time/step_s", "time/rollout_s", "tokens_per_s")
  comparable = lambda rows: [{k: v for k, v in r.items() if k not in wall} for r in rows]
  resumed = read_jsonl(str(tmp_path / "killed" / "metrics.jsonl"))
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  assert comparable(resumed) == comparable(reference)


class _CharTokenizer:
  """Token i decodes to chr(ord('a') + i); 0 is the pad id."""

  pad_id = 0

  def decode(self, ids):
    return "".join(chr(ord("a") + int(i)) for i in ids)


def test_stop_length_and_text_cut():
  decode = _CharTokenizer().decode
  assert text_lib.stop_length([1, 2, 3, 4, 5], decode, ("cd",)) == 3  # "bcd": through "d"
  assert text_lib.stop_length([1, 2, 3, 4, 5], decode, ("ef", "c")) == 2  # the earliest wins
  assert text_lib.stop_length([1, 2, 3], decode, ("x",)) is None
  assert text_lib.stop_length([1, 2, 3], decode, ()) is None
  assert text_lib.cut_at_stop("abc\n\nQuestion: next", ("\n\nQuestion:",)) == "abc\n\nQuestion:"
  assert text_lib.cut_at_stop("abc", ("z",)) == "abc"


def test_stop_at_masks_everything_after_the_stop_string():
  tok = _CharTokenizer()
  tokens = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9], [1, 1, 1, 0, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  r = sampling.Rollout(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask),
                       logprobs=jnp.asarray(-np.ones((3, 5)) * mask),
                       lengths=jnp.asarray(mask.sum(1)), truncated=jnp.asarray([False, True, False]),
                       experts=jnp.zeros((1, 3, 7, 2), jnp.int32),
                       forced=jnp.asarray(np.eye(3, 5, 2, dtype=bool)))
  out, host_mask = rollout.stop_at(r, tokens, mask, tok, ("cd", "gh"))
  # Row 0 "bcde" stops after "d" (3 tokens), row 1 "fghij" after "h" (3), row 2 never.
  keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(out.mask, keep)
  np.testing.assert_array_equal(host_mask, keep)
  np.testing.assert_array_equal(out.tokens, np.where(keep, tokens, 0))
  np.testing.assert_array_equal(out.logprobs, -1.0 * keep)
  np.testing.assert_array_equal(out.lengths, [3, 3, 3])
  np.testing.assert_array_equal(out.truncated, [False, False, False])  # row 1 ended at "gh"
  np.testing.assert_array_equal(out.forced, np.eye(3, 5, 2, dtype=bool) & keep)
  assert [tok.decode(t[m]) for t, m in zip(tokens, host_mask)] == ["bcd", "fgh", "bbb"]


def test_a_real_rollout_ends_at_its_stop_string():
  """The tiny model's greedy samples with the bundled tokenizer: the stop string is the text of
  row 0's second sampled token, so row 0 keeps two tokens and nothing after them counts."""
  cfg = model.ModelConfig.preset("tiny", vocab_size=1024)
  tok = bundled()
  params = model.init_params(cfg, jax.random.key(0))
  prompts = jnp.asarray([tok.prompt_ids("12 + 34 =")] * 2, jnp.int32)
  r = sampling.generate(params, cfg, prompts, jnp.ones_like(prompts, bool), rng=jax.random.key(1),
                        num_samples=1, max_new_tokens=8, strategy=(sampling.Greedy(),),
                        eos_id=tok.eos_id)
  tokens, mask = np.asarray(r.tokens), np.asarray(r.mask)
  stop = tok.decode(tokens[0, 1:2])
  assert stop and mask[0].sum() > 2
  n = text_lib.stop_length(tokens[0][mask[0]], tok.decode, (stop,))
  out, host_mask = rollout.stop_at(r, tokens, mask, tok, (stop,))
  assert n <= 2 and host_mask[0].sum() == n and np.asarray(out.mask)[0, n:].sum() == 0
  assert np.abs(np.asarray(out.logprobs)[0, n:]).sum() == 0
  assert np.asarray(out.logprobs)[0, :n].min() < 0  # the kept tokens keep their log-probs
  assert stop in tok.decode(tokens[0][host_mask[0]])
