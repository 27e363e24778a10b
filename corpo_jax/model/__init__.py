"""Mixtral-style MoE transformer with a thinking head: config, layers, MoE, model, HF interop."""

from corpo_jax.model.config import ModelConfig
from corpo_jax.model.transformer import (Cache, Hidden, Output, abstract_params, cache_logical_axes,
                                         count_params, decoding_config, for_decoding, forward, init_cache, init_params, merge_aux,
                                         param_shardings, project, repeat_cache, run, think_mask)

__all__ = ["ModelConfig", "Cache", "Hidden", "Output", "abstract_params", "cache_logical_axes",
           "count_params", "decoding_config", "for_decoding", "forward", "init_cache", "init_params", "merge_aux", "param_shardings",
           "project", "repeat_cache", "run", "think_mask"]
