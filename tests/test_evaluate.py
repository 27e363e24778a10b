"""pass@k: hand-computed values and agreement with the combinatorial definition."""

import math

import numpy as np
import pytest

from corpo_jax.evaluate import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n,c,k,want", [
    (4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 2, 2, 5 / 6),
    (4, 3, 2, 1.0), (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
])
def test_hand_computed(n, c, k, want):
  assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_equals_combinatorial_definition():
  for n in range(1, 12):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_mean_over_problems():
  correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
  assert mean_pass_at_k(correct, [1, 2]) == pytest.approx({1: (0.25 + 0.5) / 2,
                                                          2: (0.5 + 5 / 6) / 2})


def test_bad_arguments():
  with pytest.raises(ValueError, match="at least k=5"):
    pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    pass_at_k(4, 5, 1)
