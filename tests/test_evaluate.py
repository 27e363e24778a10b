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


def test_evaluate_task_with_scripted_samples():
  """Four arithmetic problems x 2 samples whose correctness and thinking are set by hand."""
  from corpo_jax.data import tasks, text, tokenizer
  from corpo_jax.evaluate import evaluate_task

  task = tasks.get("arithmetic", min_digits=2, max_digits=2)
  examples = [task.example("eval", i) for i in range(4)]
  wrong = lambda ex: str(int(ex.answer) + 1)
  # (thinks, right) per sample; problem p's samples are rows 2p, 2p + 1.
  plan = [(True, True), (True, True), (True, True), (False, False), (False, False),
          (False, True), (True, False), (False, False)]
  texts = [text.completion_text(ex.trace, ex.answer if right else wrong(ex)) if thinks
           else text.completion_text("", ex.answer if right else wrong(ex))
           for (thinks, right), ex in zip(plan, [e for e in examples for _ in range(2)])]
  calls = []

  def generate_fn(prompts, mask, n):
    calls.append((prompts.shape, int(mask.sum()), n))
    start = sum(shape[0] for shape, _, _ in calls[:-1]) * n
    return texts[start:start + prompts.shape[0] * n]

  row = evaluate_task(generate_fn, tokenizer.bundled(), task, num_prompts=4, num_samples=2,
                      ks=(1, 2), prompts_per_batch=3)
  assert [c[0][0] for c in calls] == [3, 1] and all(c[2] == 2 for c in calls)
  assert row["accuracy"] == pytest.approx(4 / 8)
  # per problem c = 2, 1, 1, 0 of n = 2: pass@2 = 1, 1, 1, 0
  assert row["pass_at_k"] == {1: pytest.approx(0.5), 2: pytest.approx(0.75)}
  assert row["transparency"] == pytest.approx(4 / 8)
  assert row["accuracy_thinking"] == pytest.approx(3 / 4)
  assert row["accuracy_direct"] == pytest.approx(1 / 4)
  assert row["alignment"] <= 1.0 and 0.0 <= row["structure"] <= 1.0
