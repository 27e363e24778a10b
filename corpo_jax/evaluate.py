"""Evaluation metrics: accuracy and pass@k with the unbiased estimator of Chen et al. (2021)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
