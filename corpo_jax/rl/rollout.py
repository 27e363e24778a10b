"""An RL step's rollout: prompts -> G sampled completions each -> rewards, and DAPO's dynamic
sampling over several prompt batches.

`Groups` holds the sampled groups of one or more prompt batches: the arrays the update trains
on stay on the devices (global arrays, laid out for the trainer's mesh), the rewards, texts and
examples are on the host (every process holds all of them, corpo_jax/distributed.py).

Dynamic sampling (`collect`, rl.dynamic_sampling): a group whose G rewards are all equal gets
zero advantage from the mean-baseline estimators (grpo, dr_grpo, rloo), so it only dilutes the
batch. `collect` keeps the informative groups of the step's first prompt batch and draws more
batches (at most rl.dynamic_sampling_max_batches in all) until B informative groups are in
hand; the first B found are trained on (in batch order), the rest discarded (so a checkpoint's
data iterator state is all a resumed run needs). If the batches run out first, the remaining
places go to uninformative groups, in order (counted: `dynamic/filled_uninformative`). With
corpo and static an all-equal group below tau still carries a (negative) signal that this drops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from corpo_jax import distributed, sampling, sharding
from corpo_jax.data import pipeline
from corpo_jax.data import text as text_lib
from corpo_jax.rl import rewards as rewards_lib

PROMPT_FIELDS = ("task_id", "index", "truncated", "think_tags")  # host columns of a prompt batch


@dataclasses.dataclass
class Groups:
  """B prompts' groups of G completions; rows b*G .. b*G+G-1 are prompt b's."""

  prompt_tokens: jax.Array  # int32 [B, P], left-padded
  prompt_mask: jax.Array  # bool [B, P]
  rollout: sampling.Rollout  # B * G rows
  rewards: np.ndarray  # float32 [B, G]
  texts: list[str]  # the decoded completions, B * G
  examples: list  # the Example each row answers, B * G
  components: dict[str, np.ndarray]  # reward name -> [B * G] values
  prompts: dict[str, np.ndarray]  # PROMPT_FIELDS -> [B]
  errors: dict[str, int]  # reward name -> completions where it raised or was not finite
  num_failed: int  # completions with at least one reward error
  tokens: int  # generated tokens

  @property
  def group_size(self) -> int:
    return self.rewards.shape[1]


def sample_groups(policy: Any, cfg: Any, mesh: jax.sharding.Mesh, prompts: dict, *,
                  rng: jax.Array, group_size: int, tokenizer: Any, tasks: Sequence[Any],
                  spec: Any, put_rows: Callable[[Any], Any], stop: Sequence[str] = (),
                  **generate_kw) -> Groups:
  """Samples `group_size` completions for each prompt of `prompts` (a loader batch as global
  arrays) with `policy` on `mesh` and scores them (rewards.compute, `spec`). `put_rows` lays the
  rollout out for the trainer (identity when the sampler ran on the trainer's mesh). `stop`:
  strings that end a completion (`stop_at`)."""
  on_mesh = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.shape))
  with jax.set_mesh(mesh):
    rollout = sampling.generate(policy, cfg, on_mesh(prompts["tokens"]),
                                on_mesh(prompts["token_mask"]), rng=rng, num_samples=group_size,
                                **generate_kw)
  rollout = put_rows(rollout)
  tokens, mask, ids = distributed.fetch(
      (rollout.tokens, rollout.mask, {f: prompts[f] for f in PROMPT_FIELDS}))
  if stop:
    rollout, mask = stop_at(rollout, tokens, mask, tokenizer, stop)
  texts = [tokenizer.decode(t[m]) for t, m in zip(tokens, mask)]
  examples = [ex for ex in pipeline.examples(ids, tasks, "train") for _ in range(group_size)]
  row_tasks = [tasks[t] for t in ids["task_id"] for _ in range(group_size)]
  scores = rewards_lib.compute(spec, texts, examples, row_tasks)
  return Groups(prompt_tokens=prompts["tokens"], prompt_mask=prompts["token_mask"],
                rollout=rollout, rewards=scores.total_N.reshape(-1, group_size), texts=texts,
                examples=examples, components=dict(scores.components), prompts=ids,
                errors=dict(scores.errors), num_failed=scores.num_failed, tokens=int(mask.sum()))


def stop_at(rollout: sampling.Rollout, tokens_NT: np.ndarray, mask_NT: np.ndarray, tokenizer: Any,
            stop: Sequence[str]) -> tuple[sampling.Rollout, np.ndarray]:
  """Ends each completion at the token that completes its first `stop` string (host-side, after
  sampling; the tokens sampled after it cost compute but are not kept): they leave the mask,
  their log-probs are 0, their ids the pad id, and the row counts as finished, not truncated.
  The stop string's tokens stay: the policy sampled them and is trained on them. Returns the
  rollout and the new host mask."""
  keep_N = mask_NT.sum(1)
  for i, (t, m) in enumerate(zip(tokens_NT, mask_NT)):
    n = text_lib.stop_length(t[m], tokenizer.decode, stop)
    keep_N[i] = keep_N[i] if n is None else n
  stopped_N = keep_N < mask_NT.sum(1)
  if not stopped_N.any():
    return rollout, mask_NT
  keep_NT = np.arange(mask_NT.shape[1])[None, :] < keep_N[:, None]  # numpy: any process's
  mask = rollout.mask & keep_NT
  return rollout.replace(
      tokens=jnp.where(mask, rollout.tokens, tokenizer.pad_id),
      mask=mask, logprobs=jnp.where(mask, rollout.logprobs, 0.0),
      lengths=jnp.minimum(rollout.lengths, keep_N.astype(np.int32)),
      truncated=rollout.truncated & ~stopped_N,
      forced=None if rollout.forced is None else rollout.forced & mask), mask_NT & keep_NT


def informative(rewards_BG: np.ndarray) -> np.ndarray:
  """bool [B]: the groups whose rewards are finite and not all equal."""
  R_BG = np.asarray(rewards_BG)
  return np.isfinite(R_BG).all(1) & (R_BG.max(1) != R_BG.min(1))


def collect(draw: Callable[[int], Groups], num_groups: int, max_batches: int,
            pad_id: int) -> tuple[Groups, dict[str, float]]:
  """Dynamic sampling (module doc): `draw(t)` samples the step's t-th prompt batch. Returns the
  `num_groups` groups to train on and the `dynamic/*` counts."""
  batches, picks = [], []
  while len(picks) < num_groups and len(batches) < max_batches:
    batches.append(draw(len(batches)))
    keep = np.flatnonzero(informative(batches[-1].rewards))
    picks += [(len(batches) - 1, int(g)) for g in keep]
  found = len(picks)
  if found < num_groups:  # out of batches: fill in with uninformative groups, in order
    rest = [(t, int(g)) for t, b in enumerate(batches)
            for g in np.flatnonzero(~informative(b.rewards))]
    picks += rest[:num_groups - found]
  stats = {"dynamic/batches": len(batches),
           "dynamic/informative_frac": found / (len(batches) * batches[0].rewards.shape[0]),
           "dynamic/filled_uninformative": max(0, num_groups - found)}
  return take(batches, picks[:num_groups], pad_id), stats


def take(batches: Sequence[Groups], picks: Sequence[tuple[int, int]], pad_id: int) -> Groups:
  """The groups `picks` ((batch, group) pairs) of `batches` as one Groups, in batch order, then
  group order; prompts left-padded with `pad_id` to the widest batch. `batches[0]` itself when
  the picks are all of its groups."""
  B0 = batches[0].rewards.shape[0]
  if sorted(picks) == [(0, g) for g in range(B0)]:
    return batches[0]
  G, width = batches[0].group_size, max(b.prompt_tokens.shape[1] for b in batches)
  parts = []  # (batch, its picked groups, their rows, how much its prompts are padded)
  for t, b in enumerate(batches):
    groups = np.asarray(sorted(g for s, g in picks if s == t), np.int32)
    if len(groups):
      rows = (groups[:, None] * G + np.arange(G)).reshape(-1)
      parts.append((b, groups, rows, width - b.prompt_tokens.shape[1]))
  cat = lambda xs, axis=0: jnp.concatenate(list(xs), axis=axis)
  pad = lambda x, n, axis, value: jnp.pad(
      x, [(n, 0) if a == axis else (0, 0) for a in range(x.ndim)], constant_values=value)
  rollout_rows = lambda field: cat(getattr(b.rollout, field)[rows] for b, _, rows, _ in parts)
  rollout = sampling.Rollout(
      tokens=rollout_rows("tokens"), mask=rollout_rows("mask"), logprobs=rollout_rows("logprobs"),
      lengths=rollout_rows("lengths"), truncated=rollout_rows("truncated"),
      experts=cat((pad(b.rollout.experts[:, rows], n, 2, 0) for b, _, rows, n in parts), axis=1),
      forced=None if batches[0].rollout.forced is None else rollout_rows("forced"))
  host = lambda field: [getattr(b, field)[i] for b, _, rows, _ in parts for i in rows]
  return Groups(
      prompt_tokens=cat(pad(b.prompt_tokens[g], n, 1, pad_id) for b, g, _, n in parts),
      prompt_mask=cat(pad(b.prompt_mask[g], n, 1, False) for b, g, _, n in parts),
      rollout=rollout, rewards=np.concatenate([b.rewards[g] for b, g, _, _ in parts]),
      texts=host("texts"), examples=host("examples"),
      components={k: np.concatenate([b.components[k][rows] for b, _, rows, _ in parts])
                  for k in batches[0].components},
      prompts={k: np.concatenate([b.prompts[k][g] for b, g, _, _ in parts])
               for k in batches[0].prompts},
      errors={k: sum(b.errors[k] for b in batches) for k in batches[0].errors},
      num_failed=sum(b.num_failed for b in batches), tokens=sum(b.tokens for b in batches))


def host_metrics(groups: Groups, num_samples: int = 2) -> dict[str, Any]:
  """The step's host-side metrics of the groups trained on, and `num_samples` logged samples
  (prompt, completion, reward, answer) for samples.jsonl."""
  out = {f"reward/{k}": float(v.mean()) for k, v in groups.components.items()}
  out.update({f"reward/{k}/errors": v for k, v in groups.errors.items()})
  out.update({"data/prompts_truncated": int(groups.prompts["truncated"].sum()),
              "data/think_tags_escaped": int(groups.prompts["think_tags"].sum()),
              "reward/scoring_failures": groups.num_failed, "tokens": groups.tokens})
  out["samples"] = [{"prompt": groups.examples[i].prompt, "completion": groups.texts[i],
                     "reward": float(groups.rewards.reshape(-1)[i]),
                     "answer": groups.examples[i].answer}
                    for i in range(min(num_samples, len(groups.texts)))]
  return out
