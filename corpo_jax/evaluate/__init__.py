"""Evaluation: accuracy, pass@k (unbiased estimator of Chen et al. 2021), thinking metrics.

The trainer evaluates at the end of every stage (and every `eval_every` steps); to evaluate a
run's newest checkpoint again:
  python -m corpo_jax.evaluate --workdir workdir/grpo    # the eval settings of its config.json
(the command line is `corpo_jax/evaluate/__main__.py`; the trainer imports this module, never the
reverse).
It samples with the run's evaluation rng, so the result pairs with the in-training evaluations
(common random numbers). `--stage sft` evaluates that stage's checkpoint instead of the newest,
`--num_prompts 512` more problems (a superset of the usual ones), `--out FILE` appends the rows
there instead of to <workdir>/eval.jsonl. A row: step, stage, task, accuracy, pass_at_k
{k: value}, grading_errors (samples whose grader raised: scored wrong), transparency, structure,
coherence, alignment, accuracy_thinking / accuracy_direct (accuracy of the samples that write a
trace / answer directly; null when there are none) and, for the verifier, per-group results.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from corpo_jax.data import pipeline
from corpo_jax.data import text as text_lib
from corpo_jax.rl import rewards


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples drawn without replacement from n (c correct) is
  correct: 1 - C(n-c, k) / C(n, k), computed as 1 - prod(1 - k / arange(n-c+1, n+1))."""
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}.")
  if k > n:
    raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}.")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_PN: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """pass@k averaged over problems; correct_PN[p, i] says whether sample i of problem p is right."""
  correct_PN = np.asarray(correct_PN, bool)
  n = correct_PN.shape[1]
  counts = correct_PN.sum(1)
  return {int(k): float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks}


# ----------------------------------------------------------------------------- sampled evaluation


def thinks(completions: Sequence[str]) -> np.ndarray:
  """bool [N]: a well-formed, non-empty trace precedes the answer (docs/algorithms.md, Evaluation)."""
  parts = [text_lib.split_completion(c) for c in completions]
  return np.array([p.well_formed and bool(p.trace) for p in parts], bool)


def thinking_metrics(completions: Sequence[str], examples, task,
                     thinking_N: np.ndarray) -> dict[str, float]:
  """The thinking metrics (docs/algorithms.md) averaged over completions: transparency (the share of
  `thinking_N`, from `thinks`), step structure, coherence and alignment."""
  scores = rewards.compute((("thinking", 1.0),), completions, examples, task)
  return {"transparency": float(thinking_N.mean()),
          **{name: float(scores.components[name].mean())
             for name in ("structure", "coherence", "alignment")}}


def accuracy_by_thinking(correct_N: np.ndarray, thinking_N: np.ndarray) -> dict[str, float | None]:
  """Accuracy of the samples that think and of those that answer directly (None when there are
  none): whether a gain comes from thinking more often or from thinking better."""
  mean = lambda sel: float(correct_N[sel].mean()) if sel.any() else None
  return {"accuracy_thinking": mean(thinking_N), "accuracy_direct": mean(~thinking_N)}


def evaluate_task(generate_fn, tokenizer, task, *, num_prompts: int, num_samples: int,
                  ks: Sequence[int], prompts_per_batch: int) -> dict:
  """Samples `num_samples` completions for the first `num_prompts` eval problems of `task`.

  generate_fn(prompts_BP, mask_BP, num_samples) -> list of B * num_samples decoded texts.
  Returns accuracy (share of exactly right samples), pass@k, the thinking metrics and, for
  tasks whose examples carry a group (the verifier's ground-truth configurations), the same
  accuracy/pass@k per group.
  """
  examples = [task.example("eval", i) for i in range(num_prompts)]
  texts = []
  for start in range(0, num_prompts, prompts_per_batch):
    chunk = examples[start:start + prompts_per_batch]
    prompts, mask = pipeline.left_pad_prompts(
        [tokenizer.prompt_ids(ex.prompt) for ex in chunk], tokenizer.pad_id)
    texts += generate_fn(prompts, mask, num_samples)
  rep = [ex for ex in examples for _ in range(num_samples)]
  # Graded like a reward: a grader that raises on one completion scores it wrong and is counted.
  exact = rewards.compute((("exact_match", 1.0),), texts, rep, task)
  correct_PN = exact.components["exact_match"].reshape(num_prompts, num_samples).astype(bool)
  thinking_N = thinks(texts)
  row = {"accuracy": float(correct_PN.mean()), "pass_at_k": mean_pass_at_k(correct_PN, ks),
         "grading_errors": exact.errors["exact_match"],
         **thinking_metrics(texts, rep, task, thinking_N),
         **accuracy_by_thinking(correct_PN.reshape(-1), thinking_N)}
  groups = sorted({ex.group for ex in examples if ex.group})
  if groups:
    row["groups"] = {
        g: {"accuracy": float(correct_PN[idx].mean()),
            "pass_at_k": mean_pass_at_k(correct_PN[idx], ks), "count": int(len(idx))}
        for g in groups for idx in [np.array([i for i, ex in enumerate(examples) if ex.group == g])]}
  return row
