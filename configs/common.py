"""Shared defaults and argument parsing for the experiment configs.

A config file is `configs/NAME.py` with `get_config(arg)`; the part after the colon in
`--config=configs/grpo.py:model=tiny,seed=3` is `arg`, parsed by `parse_arg`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from corpo_jax.model.config import ModelConfig


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2,flag" into a ConfigDict typed like `defaults`.

  A bare name sets a boolean to True. Unknown names are an error listing the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value: {key}=...")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} must be true or false.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Every ModelConfig field of a preset, so any of them can be overridden by flag
  (`--config.model.num_layers=2`); corpo_jax.model.ModelConfig.from_dict reads it back."""
  return ml_collections.ConfigDict(ModelConfig.preset(preset, **overrides).to_dict())


def base_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields every experiment has."""
  config = ml_collections.ConfigDict()
  config.seed = arg.seed  # seeds parameter init, sampling and data order
  config.workdir = arg.workdir  # checkpoints, metrics.jsonl, eval.jsonl go here
  config.model = model_config(arg.model)  # a preset of corpo_jax/model/config.py, every field
  # Device mesh sizes over axes (data, fsdp, expert, tensor); one may be -1 (all remaining).
  config.mesh = (-1, 1, 1, 1)
  return config
