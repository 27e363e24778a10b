import numpy as np
import pytest

from corpo_jax.rl import dynamic_sampling


def test_select_drops_all_equal_groups_and_refills_in_order():
  R = np.array([[1, 1, 1], [0, 1, 0], [2, 2, 2], [0, 0, 5], [np.nan, 1, 0], [3, 4, 3]], np.float32)
  kept, n = dynamic_sampling.select(R, 2)
  np.testing.assert_array_equal(kept, [1, 3])
  assert n == 3
  kept, n = dynamic_sampling.select(R, 5)  # fewer informative groups than asked for
  np.testing.assert_array_equal(kept, [1, 3, 5])
  with pytest.raises(ValueError, match=r"\[B, G\]"):
    dynamic_sampling.select(R.ravel(), 2)
