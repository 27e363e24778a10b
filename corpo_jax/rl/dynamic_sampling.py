"""DAPO's dynamic sampling, host side: keep only groups whose rewards differ, refill the batch.

A group whose G rewards are all equal gets zero advantage from the mean-baseline estimators
(grpo, dr_grpo, rloo), so it only dilutes the batch. The loop samples more prompts than it
trains on (or several rollouts), calls `select` on the rewards of all of them, and trains on the
returned groups, sampling again while fewer than `num_groups` came back. Note that with corpo
and static, an all-equal group below tau still carries a (negative) signal that this drops.
"""

from __future__ import annotations

import numpy as np


def select(rewards_BG: np.ndarray, num_groups: int) -> tuple[np.ndarray, int]:
  """(indices of the first `num_groups` informative groups, in order; how many groups were
  informative). A group is informative when its rewards are finite and not all equal."""
  R_BG = np.asarray(rewards_BG)
  if R_BG.ndim != 2:
    raise ValueError(f"rewards must be [B, G], got shape {R_BG.shape}.")
  informative_B = np.isfinite(R_BG).all(1) & (R_BG.max(1, initial=-np.inf) != R_BG.min(1, initial=np.inf))
  kept = np.flatnonzero(informative_B)
  return kept[:num_groups], len(kept)
