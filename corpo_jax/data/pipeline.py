"""grain pipelines: RL prompt batches and SFT sequence batches, sharded, shuffled, checkpointable.

Both are `grain.DataLoader`s over a random-access source: the IndexSampler shuffles record
indices with `seed`, shards them per JAX process (grain.sharding.ShardByJaxProcess unless
`shard_options` is given) and repeats forever (num_epochs=None); a batch function pads each
batch to the smallest bucket length that fits its longest row. Iterate with `iter(loader)`: the
DataLoaderIterator has get_state()/set_state() and is saved by orbax through
grain.checkpoint.CheckpointHandler / CheckpointSave / CheckpointRestore. A restored iterator
continues with exactly the batches the uninterrupted one yields. The batch order and the saved
state depend on worker_count (grain gives each worker its own records) and on the number of
processes. With `batch_rows` (the trainer's way, corpo_jax/distributed.py) the stream is instead
one unsharded shuffle cut into global batches of `batch_size` records, the same for any number
of processes, and this process loads only rows `batch_rows` of each (the saved state then
depends on those rows). Sources and tokenizers pickle, so worker_count > 0 works (grain spawns
workers: guard `__main__` and parse absl flags before iterating).

RL prompts mix a stage's tasks by their weights (Task.weight, config.tasks.<name>.weight), exactly
and deterministically: the stream cycles through sum(w) slots, w_t of them task t's, spread evenly
(weights 3 and 1: t0 t0 t1 t0, repeated), and each slot takes its task's next example in that
task's own shuffle, reshuffled every epoch of the task (_MixSampler). Any run of whole cycles then
holds the tasks 3:1 exactly, whatever the tasks' sizes; the iterator state is still one stream
position. A one-task stream is the plain shuffle of that task.

RL batch (prompts left-padded so generation appends on the right), B rows:
  tokens [B, T] int32, token_mask [B, T] bool, task_id [B] int32 (index into `tasks`),
  index [B] int64 (example index in the split), truncated [B] bool (the prompt was longer than
  `max_prompt_len` and kept only <bos> and its last tokens), think_tags [B] int32 (literal think
  tags escaped in the prompt, Tokenizer.guard); `examples(batch, tasks, split)`
  rebuilds the Examples the rewards need. A longer prompt raises ValueError naming its source
  (file:line for jsonl tasks) when long_prompts="reject" (the default), or is cut when "truncate".
SFT batch (right-padded), B rows of <bos> prompt <think> trace </think> answer <eos>:
  tokens, token_mask, trace_mask (tokens after <think> up to and including </think>: the
  thinking head's targets), answer_mask (the base head's targets: the <think> that opens the
  trace, and the tokens after </think> up to and including <eos>),
  step_labels [B, T] int32 (data/steps.py classes on the first token of each trace line),
  think_tags [B] int32 (literal think tags escaped in the row's text).
Prompts are in the tokenizer's prompt format (Tokenizer.prompt_ids) in both.
Masks mark the positions of target tokens; the trainer shifts them against the logits.

One module (just over 400 lines) because the RL and SFT loaders share the sampler, the process
sharding, the length buckets and the checkpointable iterator.
"""

from __future__ import annotations

import fractions
import math
import os
import sys
from typing import Sequence

import grain
import numpy as np

from corpo_jax.data import steps as steps_lib
from corpo_jax.data import text as text_lib
from corpo_jax.data.tasks import Example, Task
from corpo_jax.data.tasks.jsonl import read_numbered
from corpo_jax.data.tokenizer import Tokenizer

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024)
_GOLDEN = (5 ** 0.5 - 1) / 2
MAX_MIX_CYCLE = 10_000  # prompts in one cycle of a weighted task mix
LONG_PROMPTS = ("reject", "truncate")
SFT_FIELDS = ("prompt", "thinking_trace", "final_output")


def _bucket(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"A sequence of {length} tokens is longer than the largest bucket "
                   f"{max(buckets)}; add a larger bucket or shorten the data.")


def _pad(rows: Sequence[np.ndarray], length: int, value, left: bool) -> np.ndarray:
  out = np.full((len(rows), length), value, dtype=rows[0].dtype)
  for i, row in enumerate(rows):
    if left:
      out[i, length - len(row):] = row
    else:
      out[i, :len(row)] = row
  return out


def left_pad_prompts(ids: Sequence[Sequence[int]], pad_id: int,
                     buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], mask [B, P]) of prompts left-padded to the bucket of the longest, as the
  RL loader pads them: evaluation batches then reuse the sampler the RL stage compiled."""
  rows = [np.asarray(seq, np.int32) for seq in ids]
  width = _bucket(max(map(len, rows)), buckets)
  return (_pad(rows, width, pad_id, left=True),
          _pad([np.ones(len(r), bool) for r in rows], width, False, left=True))


class _PadBatch:
  """Stacks rows of variable-length arrays, padding every [T] field to the batch's bucket."""

  def __init__(self, buckets: Sequence[int], pad_id: int, left: bool):
    self.buckets, self.pad_id, self.left = tuple(buckets), pad_id, left

  def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    length = _bucket(max(len(r["tokens"]) for r in rows), self.buckets)
    out = {}
    for key, first in rows[0].items():
      values = [r[key] for r in rows]
      if np.ndim(first) == 0:
        out[key] = np.stack(values)
      else:
        fill = self.pad_id if key == "tokens" else np.zeros((), first.dtype)
        out[key] = _pad(values, length, fill, self.left)
    return out


def pad_to(batch: dict[str, np.ndarray], length: int, pad_id: int, left: bool) -> dict:
  """A batch with every [B, T] field padded to `length` as the loaders pad (tokens with pad_id,
  the other fields with zeros; on the left for RL prompts, on the right for SFT sequences)."""
  out = {}
  for key, value in batch.items():
    if value.ndim < 2:
      out[key] = value
      continue
    fill = (length - value.shape[1], 0) if left else (0, length - value.shape[1])
    out[key] = np.pad(value, [(0, 0), fill], constant_values=pad_id if key == "tokens" else 0)
  return out


class PromptSource(grain.sources.RandomAccessDataSource):
  """The tasks' examples of `split` end to end: record r is example r - offsets[t] of the task t
  with offsets[t] <= r < offsets[t + 1] (the samplers choose the mix)."""

  def __init__(self, tasks: Sequence[Task], tokenizer: Tokenizer, split: str,
               max_prompt_len: int = DEFAULT_BUCKETS[-1], long_prompts: str = "reject"):
    if long_prompts not in LONG_PROMPTS:
      raise ValueError(f"long_prompts={long_prompts!r} is not one of {LONG_PROMPTS}.")
    if max_prompt_len < 2:
      raise ValueError(f"max_prompt_len={max_prompt_len} must be >= 2 (<bos> and a token).")
    self.tasks, self.tokenizer, self.split = list(tasks), tokenizer, split
    self.max_prompt_len, self.long_prompts = max_prompt_len, long_prompts
    self.sizes = tuple(t.size(split) for t in self.tasks)
    self.offsets = tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))

  def __repr__(self) -> str:  # grain compares it when restoring an iterator
    return (f"PromptSource({self.tasks!r}, {self.tokenizer!r}, split={self.split!r}, "
            f"max_prompt_len={self.max_prompt_len}, long_prompts={self.long_prompts!r})")

  def __len__(self) -> int:
    return sum(self.sizes)

  def __getitem__(self, record: int) -> dict:
    task_id = int(np.searchsorted(self.offsets, record, side="right")) - 1
    index = record - self.offsets[task_id]
    ex = self.tasks[task_id].example(self.split, index)
    where = ex.meta.get("source", f"{self.split} example {index} of {self.tasks[task_id]!r}")
    tokens = np.asarray(self.tokenizer.prompt_ids(ex.prompt, f"The prompt of {where}"), np.int32)
    truncated = len(tokens) > self.max_prompt_len
    if truncated and self.long_prompts == "reject":
      raise ValueError(f"The prompt of {where} has {len(tokens)} tokens, more than "
                       f"max_prompt_len={self.max_prompt_len}; shorten it, raise "
                       f"config.<stage>.max_prompt_len, or set config.<stage>.long_prompts="
                       f"'truncate' to keep <bos> and its last tokens.")
    if truncated:
      tokens = np.concatenate([tokens[:1], tokens[len(tokens) - self.max_prompt_len + 1:]])
    return {"tokens": tokens, "token_mask": np.ones(len(tokens), bool),
            "task_id": np.int32(task_id), "index": np.int64(index),
            "truncated": np.bool_(truncated),
            "think_tags": np.int32(text_lib.count_think_tags(ex.prompt))}


def mix_slots(weights: Sequence[float]) -> tuple[int, ...]:
  """The task of each position of one cycle of a weighted mix (module doc): the weights as
  whole numbers in their lowest terms (3, 1), each task's slots spread evenly (slot j of task t at
  time (j + 1/2) / w_t, ties to the lower task)."""
  ratios = [fractions.Fraction(w).limit_denominator(MAX_MIX_CYCLE) for w in weights]
  scale = math.lcm(*(r.denominator for r in ratios))
  counts = [int(r * scale) for r in ratios]
  if min(counts) < 1 or sum(counts) // math.gcd(*counts) > MAX_MIX_CYCLE:
    raise ValueError(f"Task weights {tuple(weights)}: their exact mix would repeat only after "
                     f"more than {MAX_MIX_CYCLE} prompts; use ratios of small whole numbers "
                     f"(e.g. weights 3 and 1).")
  counts = [c // math.gcd(*counts) for c in counts]
  times = sorted((fractions.Fraction(2 * j + 1, 2 * c), t)
                 for t, c in enumerate(counts) for j in range(c))
  return tuple(t for _, t in times)


class _MixSampler:
  """Stream position p -> a record of PromptSource: the task of slot p % len(slots), and the
  next example of that task's own IndexSampler (shuffled with a seed from (seed, task); task 0's
  is `seed`, so one task gives exactly the plain IndexSampler's stream). Unsharded: the
  DataLoader, or _RowsSampler, picks each process's positions."""

  def __init__(self, sizes: Sequence[int], slots: Sequence[int], seed: int):
    self.sizes, self.slots, self.seed = tuple(sizes), tuple(slots), seed
    self._offsets = np.cumsum((0,) + self.sizes[:-1])
    self._per_cycle = [self.slots.count(t) for t in range(len(self.sizes))]
    self._rank = [self.slots[:s].count(t) for s, t in enumerate(self.slots)]
    self._samplers = [grain.samplers.IndexSampler(
        num_records=n, shuffle=True, num_epochs=None,
        seed=seed if t == 0 else int(np.random.SeedSequence((seed, t)).generate_state(1)[0]))
        for t, n in enumerate(self.sizes)]

  def __repr__(self) -> str:  # grain compares it when restoring an iterator
    return f"_MixSampler(sizes={self.sizes}, slots={self.slots}, seed={self.seed})"

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    cycle, slot = divmod(index, len(self.slots))
    task = self.slots[slot]
    key = self._samplers[task][cycle * self._per_cycle[task] + self._rank[slot]].record_key
    return grain.RecordMetadata(index=index, record_key=int(self._offsets[task] + key))


def examples(batch: dict[str, np.ndarray], tasks: Sequence[Task], split: str) -> list[Example]:
  """The Examples behind an RL batch, in row order (for scoring completions)."""
  return [tasks[t].example(split, int(i)) for t, i in zip(batch["task_id"], batch["index"])]


class _RowsSampler:
  """Global batch s holds records s*B .. s*B+B-1 of an unsharded sampler; this sampler's
  records are rows `rows` of each, in order (local record i is row rows[i % b] of batch i // b)."""

  def __init__(self, sampler: grain.samplers.IndexSampler, batch_size: int, rows: Sequence[int]):
    self.sampler, self.batch_size, self.rows = sampler, batch_size, tuple(int(r) for r in rows)

  def __repr__(self) -> str:  # grain compares it when restoring an iterator
    return f"_RowsSampler({self.sampler!r}, batch_size={self.batch_size}, rows={self.rows})"

  def __len__(self) -> int:
    return len(self.sampler) // self.batch_size * len(self.rows)

  def __getitem__(self, index: int):
    batch, row = divmod(index, len(self.rows))
    return self.sampler[batch * self.batch_size + self.rows[row]]


def _loader(source, batch_fn, *, batch_size: int, seed: int,
            shard_options: grain.sharding.ShardOptions | None, worker_count: int,
            batch_rows: Sequence[int] | None, sampler=None):
  """A DataLoader over `source` in the order of `sampler` (an unsharded stream; default: grain's
  IndexSampler, shuffled with `seed` and sharded by shard_options)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if batch_rows is None:
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  else:
    assert shard_options is None and len(batch_rows) and all(
        0 <= r < batch_size for r in batch_rows), batch_rows
    shard_options = grain.sharding.NoSharding()
  if sampler is None:
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options,
                                          shuffle=True, num_epochs=None, seed=seed)
  if batch_rows is not None:
    sampler, batch_size = _RowsSampler(sampler, batch_size, batch_rows), len(batch_rows)
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=worker_count, shard_options=shard_options,
      operations=[grain.transforms.Batch(batch_size, drop_remainder=True, batch_fn=batch_fn)])


def rl_prompts(tasks: Sequence[Task], tokenizer: Tokenizer, *, batch_size: int, seed: int,
               split: str = "train", buckets: Sequence[int] = DEFAULT_BUCKETS,
               max_prompt_len: int | None = None, long_prompts: str = "reject",
               shard_options: grain.sharding.ShardOptions | None = None,
               worker_count: int = 0,
               batch_rows: Sequence[int] | None = None) -> grain.DataLoader:
  """Batches of left-padded prompts for rollouts, the tasks mixed by their weights (module doc):
  `batch_size` per process, or with `batch_rows` (module doc) those rows of each global batch
  of `batch_size`. Prompts longer than max_prompt_len (default: the largest bucket) are
  rejected or truncated (module doc)."""
  max_prompt_len = max_prompt_len or max(buckets)
  if max_prompt_len > max(buckets):
    raise ValueError(f"max_prompt_len={max_prompt_len} is longer than the largest bucket "
                     f"{max(buckets)}; lower it or add a bucket.")
  source = PromptSource(tasks, tokenizer, split, max_prompt_len, long_prompts)
  sampler = _MixSampler(source.sizes, mix_slots([t.weight for t in source.tasks]), seed)
  return _loader(source, _PadBatch(buckets, tokenizer.pad_id, left=True), batch_size=batch_size,
                 seed=seed, shard_options=shard_options, worker_count=worker_count,
                 batch_rows=batch_rows, sampler=sampler)


def sft_example(tokenizer: Tokenizer, prompt: str, trace: str, answer: str,
                where: str = "an SFT row") -> dict:
  """One SFT row: tokens and the masks/labels described in the module docstring.

  The row's text is encoded in one pass (corpo_jax/data/tokenizer.py), its parts found by byte
  offsets: the prompt's tokens equal `tokenizer.prompt_ids(prompt)`, those RL and evaluation
  sample from. `where` names the row in errors.
  """
  tags = sum(map(text_lib.count_think_tags, (prompt, trace, answer)))
  guard = lambda text: tokenizer.guard(text, where)
  prompt_text = text_lib.format_prompt(guard(prompt), tokenizer.prompt_format)
  trace = guard(trace).strip()
  ids, spans = tokenizer.encode_with_offsets(
      prompt_text + text_lib.completion_text(trace, guard(answer)))
  tokens = np.asarray([tokenizer.bos_id] + ids + [tokenizer.eos_id], np.int32)
  (open_at,), (close_at,) = (np.flatnonzero(tokens == i) for i in
                             (tokenizer.think_start_id, tokenizer.think_end_id))
  assert list(tokens[:open_at]) == tokenizer.prompt_ids(prompt, where), (
      f"{tokenizer!r} merges the prompt's last token with <think>")
  positions = np.arange(len(tokens))
  step_labels = np.zeros(len(tokens), np.int32)
  ends = np.asarray([end for _, end in spans])
  line_start = len((prompt_text + text_lib.THINK_OPEN + "\n").encode())
  for line in trace.split("\n"):
    if line:  # the token holding the line's first byte (+1: <bos>)
      step_labels[1 + np.searchsorted(ends, line_start, side="right")] = steps_lib.step_type(line)
    line_start += len(line.encode()) + 1
  return {"tokens": tokens, "token_mask": np.ones(len(tokens), bool),
          "trace_mask": (positions > open_at) & (positions <= close_at),
          "answer_mask": (positions > close_at) | (positions == open_at),
          "step_labels": step_labels,
          "think_tags": np.int32(tags)}


def read_traces(path: str) -> list[dict]:
  """Rows of a distill output file (corpo_jax.data.distill): prompt, thinking_trace, final_output."""
  if not os.path.isfile(path):
    raise ValueError(f"Trace file {path!r} does not exist; write one with "
                     "`python -m corpo_jax.data.distill --input ... --output ...`.")
  check = lambda row: None if all(isinstance(row.get(k), str) for k in SFT_FIELDS) else (
      f"need string fields {SFT_FIELDS} (the distill output format)")
  rows = read_numbered(path, "Trace file", "the distill output format", check)
  return [{**{k: row[k] for k in SFT_FIELDS}, "source": f"{path}:{line}"} for line, row in rows]


class TaskTraces(grain.sources.RandomAccessDataSource):
  """A task's reference traces as SFT rows (row i = example i of `split`)."""

  def __init__(self, task: Task, split: str = "train"):
    self.task, self.split = task, split

  def __repr__(self) -> str:
    return f"TaskTraces({self.task!r}, split={self.split!r})"

  def __len__(self) -> int:
    return self.task.size(self.split)

  def __getitem__(self, index: int) -> dict:
    ex = self.task.example(self.split, index)
    return {"prompt": ex.prompt, "thinking_trace": ex.trace, "final_output": ex.answer,
            "source": ex.meta.get("source", f"{self.split} example {index} of {self.task!r}")}


class SftSource(grain.sources.RandomAccessDataSource):
  """Tokenized SFT rows from a sequence of {prompt, thinking_trace, final_output} dicts.

  trace_share: the share of rows that keep their trace; the others get an empty think block
  before the answer (a plain answer). 1.0 trains thinking only, 0.0 is the no-thinking
  baseline, values between mix both behaviours (RL then chooses between them). Which rows keep
  their trace depends only on the row index (a golden-ratio sequence: any run of n rows holds
  round(n * trace_share) traced ones, to within one).
  """

  def __init__(self, rows, tokenizer: Tokenizer, trace_share: float = 1.0):
    if not 0.0 <= trace_share <= 1.0:
      raise ValueError(f"trace_share={trace_share} must be in [0, 1].")
    self.rows, self.tokenizer, self.trace_share = rows, tokenizer, trace_share

  def __repr__(self) -> str:
    rows = self.rows if isinstance(self.rows, TaskTraces) else f"<{len(self.rows)} rows>"
    share = "" if self.trace_share == 1.0 else f", trace_share={self.trace_share}"
    return f"SftSource({rows}, {self.tokenizer!r}{share})"  # saved with the grain iterator

  def __len__(self) -> int:
    return len(self.rows)

  def keeps_trace(self, index: int) -> bool:
    return (index * _GOLDEN) % 1.0 < self.trace_share

  def __getitem__(self, index: int) -> dict:
    row = self.rows[index]
    trace = row["thinking_trace"] if self.keeps_trace(index) else ""
    return sft_example(self.tokenizer, row["prompt"], trace, row["final_output"],
                       where=row.get("source", f"SFT row {index}"))


def check_lengths(source: SftSource, max_len: int) -> None:
  """Every row of a trace file (a list of rows; a task's generated rows are bounded by the task)
  fits `max_len` tokens, checked when it is loaded, not when a batch first reaches the row; the
  error names file:line. A row whose bytes cannot fit (no token is longer than the tokenizer's
  longest piece) is refused without tokenizing it (a 10 MB row would take seconds)."""
  if isinstance(source.rows, TaskTraces):
    return
  tok = source.tokenizer
  piece_bytes = max(len(tok.id_to_piece(i).encode()) for i in range(tok.vocab_size))
  for i, row in enumerate(source.rows):
    trace = row["thinking_trace"].strip() if source.keeps_trace(i) else ""
    size = sum(len(text.encode()) for text in (row["prompt"], trace, row["final_output"]))
    n = None if size > max_len * piece_bytes else len(source[i]["tokens"])
    if n is None or n > max_len:
      what = f"{n} tokens" if n else f"{size} bytes (at least {size // piece_bytes} tokens)"
      raise ValueError(f"The SFT row {row.get('source', f'{i}')} has {what}, more than the "
                       f"largest bucket's {max_len}; shorten it or remove it from the file.")


def sft_sequences(rows, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                  trace_share: float = 1.0, buckets: Sequence[int] = DEFAULT_BUCKETS,
                  shard_options: grain.sharding.ShardOptions | None = None,
                  worker_count: int = 0,
                  batch_rows: Sequence[int] | None = None) -> grain.DataLoader:
  """Batches of right-padded SFT sequences. `rows`: read_traces(path), TaskTraces(task) or any
  sequence of {prompt, thinking_trace, final_output} dicts; trace_share: see SftSource;
  `batch_rows` as in rl_prompts. Rows longer than the largest bucket are refused here
  (check_lengths)."""
  source = SftSource(rows, tokenizer, trace_share)
  check_lengths(source, max(buckets))
  return _loader(source, _PadBatch(buckets, tokenizer.pad_id, left=False),
                 batch_size=batch_size, seed=seed, shard_options=shard_options,
                 worker_count=worker_count, batch_rows=batch_rows)
