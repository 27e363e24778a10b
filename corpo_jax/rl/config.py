"""The one frozen description of an RL update, and the one place a config dict becomes it.

Every option of docs/algorithms.md is a field here, so any ablation is one flag
(`--config.rl.advantage=corpo --config.rl.tau=0.5`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "static", "corpo")
TAU_BASELINES = ("static", "corpo")  # estimators whose baseline is not a mean of the rewards
SCALES = ("none", "group", "batch")
# Per-token KL penalties, each named in docs/algorithms.md by the gradient its expectation has.
KL_ESTIMATORS = ("k3_ratio", "k2", "k3", "k1")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")
REFERENCE_DTYPES = ("param", "bfloat16")  # rl/reference.py
BASE = "base"  # freeze pattern: every parameter outside params["thinking"]


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Options of the RL update (corpo_jax/rl/step.py); see docs/algorithms.md for the math."""

  # Advantages (advantages.py).
  advantage: str = "grpo"  # one of ESTIMATORS
  # "none", "group" (group std, Bessel) or "batch" (std over the batch; for static/corpo the
  # spread about their baseline, so an all-equal batch cannot explode: docs/algorithms.md).
  scale: str = "group"
  tau: float = 0.0  # correctness threshold of static/corpo and of the diagnostics (R < tau fails)
  # Added to the std before dividing (TRL's 1e-4): reward spreads far below it give advantages far
  # below 1 instead of full-size ones (docs/algorithms.md "Scaling").
  eps: float = 1e-4
  # Policy loss (losses.py).
  eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low
  eps_high: float = 0.2  # ratio <= 1 + eps_high (> eps_low: DAPO clip-higher)
  beta: float = 0.0  # KL weight against the frozen reference policy (0: no reference pass)
  # The reference policy's dtype: "param" (the starting params) or "bfloat16" (a cast copy, half
  # the memory and gather bytes; corpo_jax/rl/reference.py).
  reference_dtype: str = "param"
  # KL penalty per token and the gradient its expectation has (docs/algorithms.md "KL"):
  # "k3_ratio" r * k3, r = pi / pi_old with its gradient: grad KL(pi || ref), also off-policy;
  # "k2" (logp - ref)^2 / 2: grad KL(pi || ref) on the first iteration only; "k3"
  # exp(ref - logp) - (ref - logp) - 1: grad KL(ref || pi) (forward); "k1" logp - ref: grad 0.
  kl_estimator: str = "k3_ratio"
  aggregation: str = "seq_mean_token_mean"  # one of AGGREGATIONS
  importance_level: str = "token"  # "token" (PPO) or "sequence" (GSPO)
  mask_truncated: bool = False  # no loss on completions that hit max_completion_len
  # Also train on the tokens the sampler forced (the thinking budget's </think>); off: the policy
  # never sampled them, so they carry no loss and no KL (Batch.forced).
  loss_on_forced: bool = False
  # DAPO soft overlong penalty, added to the rewards inside the update (not to the rows that
  # mask_truncated takes out of the loss: they keep their raw reward in the baseline).
  overlong_penalty: bool = False
  overlong_buffer: int = 16  # last tokens before max_completion_len where the penalty ramps up
  overlong_factor: float = 1.0  # penalty at (and beyond) max_completion_len
  max_completion_len: int = 64  # the sampler's max_new_tokens; Dr. GRPO normaliser, overlong
  # Sampling-related.
  temperature: float = 1.0  # log-probs use logits / temperature (the sampling temperature)
  # DAPO dynamic sampling (corpo_jax/rl/rollout.py): train only on groups whose rewards differ,
  # refilling from up to dynamic_sampling_max_batches prompt batches per step (the first included).
  dynamic_sampling: bool = False
  dynamic_sampling_max_batches: int = 4
  router_replay: bool = False  # reuse the rollout's base-layer expert choices in training
  # Update mechanics (step.py).
  num_iterations: int = 1  # optimizer steps per rollout batch (old log-probs computed once)
  num_micro_batches: int = 1  # gradient accumulation: rows are split into this many parts
  logprob_chunk: int = 128  # time steps projected to logits at once ([B, chunk, V] live)
  # Run each prompt once for its G completions (step.py), not G times. Needs num_micro_batches to
  # divide G and, on a mesh, each micro-batch's rows to divide over the batch devices.
  share_prompt: bool = True
  # Optimizer (train/optim.py: AdamW, linear warmup then cosine decay to 0, global-norm clipping).
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  decay_steps: int = 0  # optimizer steps of the cosine decay after warmup; 0: constant
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip_norm: float = 1.0  # 0: no clipping
  # Regexes matched (re.match, up to a "/" or the end) against "/"-joined parameter paths such
  # as "layers/moe/router" or "thinking/step_head"; "base" = everything but params["thinking"].
  freeze: tuple[str, ...] = ()

  def __post_init__(self):
    for field in dataclasses.fields(self):  # NaN passes every range check below
      value = getattr(self, field.name)
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"rl.{field.name}={value} must be a finite number.")
    _check_choice("advantage", self.advantage, ESTIMATORS)
    _check_choice("scale", self.scale, SCALES)
    _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    _check_choice("aggregation", self.aggregation, AGGREGATIONS)
    _check_choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
    _check_choice("reference_dtype", self.reference_dtype, REFERENCE_DTYPES)
    check_scale(self.advantage, self.scale)
    for name in ("eps", "temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be > 0.")
    for name in ("eps_low", "eps_high", "beta", "learning_rate", "weight_decay", "grad_clip_norm",
                 "overlong_factor"):
      if getattr(self, name) < 0:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 0.")
    if self.eps_low >= 1:
      raise ValueError(f"rl.eps_low={self.eps_low} must be < 1 (the ratio's lower clip is 1 - eps_low).")
    for name in ("num_iterations", "num_micro_batches", "logprob_chunk", "max_completion_len",
                 "dynamic_sampling_max_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1.")
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 0.")
    if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
      raise ValueError(f"rl.b1={self.b1} and rl.b2={self.b2} must be in [0, 1).")
    if self.overlong_penalty and not 1 <= self.overlong_buffer <= self.max_completion_len:
      raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} must be in "
                       f"[1, rl.max_completion_len={self.max_completion_len}].")
    if isinstance(self.freeze, str):
      raise ValueError(f"rl.freeze={self.freeze!r} must be a tuple of patterns, e.g. ({self.freeze!r},).")
    for pattern in self.freeze:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"rl.freeze pattern {pattern!r} is not a valid regex: {e}.") from None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RLConfig":
    """The one place a (ml_collections or plain) dict of RL options becomes an RLConfig."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown rl config field(s) {unknown}; valid fields: {sorted(names)}.")
    if "freeze" in d and not isinstance(d["freeze"], str):
      d["freeze"] = tuple(d["freeze"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_scale(advantage: str, scale: str) -> None:
  """Rejects scalings an estimator is not defined with (docs/algorithms.md)."""
  if advantage in TAU_BASELINES and scale == "group":
    raise ValueError(f"rl.advantage={advantage!r} with rl.scale='group' divides a homogeneous "
                     f"failing group's (R - tau) by a std of 0 (+ eps); use scale=none or batch.")
  if advantage == "dr_grpo" and scale != "none":
    raise ValueError(f"rl.advantage='dr_grpo' never divides by a std but rl.scale={scale!r}; use "
                     f"scale=none (or advantage=grpo to scale).")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"rl.{field}={value!r} is not one of {choices}.")
