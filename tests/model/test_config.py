"""ModelConfig: presets (parameter counts of the real Mixtrals) and validation of user values."""

import dataclasses

import pytest

from corpo_jax import model
from corpo_jax.model.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name,expected", [("mixtral_8x7b", 46.7e9), ("mixtral_8x22b", 141e9)])
def test_mixtral_presets_have_the_published_parameter_counts(name, expected):
  n = model.count_params(model.abstract_params(ModelConfig.preset(name)))  # eval_shape: no memory
  assert abs(n - expected) / expected < 0.01, n


def test_mixtral_8x7b_parameter_count_by_hand():
  c = ModelConfig.preset("mixtral_8x7b")
  D, F, E, L, V = c.d_model, c.d_ff, c.num_experts, c.num_layers, c.vocab_size
  attn = D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  per_layer = attn + D * E + 3 * E * D * F + 2 * D
  assert model.count_params(model.abstract_params(c)) == L * per_layer + 2 * V * D + D


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
  cfg = ModelConfig.preset(name)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("d_model", -4), ("num_layers", 0), ("num_heads", 0), ("num_kv_heads", 0),
    ("head_dim", 7), ("d_ff", 0), ("num_experts", 0), ("top_k", 0), ("top_k", 5),
    ("max_seq_len", 0), ("num_step_classes", 0), ("num_layers", 2.5),
    ("num_kv_heads", 3),  # 8 query heads are not a multiple of 3 kv heads
    ("rope_theta", 0.0), ("norm_eps", -1e-5), ("load_balance_weight", -0.1), ("z_loss_weight", -1.0),
    ("capacity_factor", 0.0), ("thinking_layers", -1),
    ("moe_dispatch", "dense"), ("remat", "all"), ("dtype", "fp8"), ("param_dtype", "int8"),
    ("pad_id", 256), ("pad_id", -2), ("think_start_id", 999), ("think_end_id", 4),
])
def test_bad_values_raise_value_error_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}"):
    ModelConfig.preset("tiny", **{field: value})


def test_unknown_preset_and_unknown_fields_are_rejected():
  with pytest.raises(ValueError, match="mixtral_8x7b"):
    ModelConfig.preset("mixtral_7b")
  with pytest.raises(ValueError, match="num_layer"):
    ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "num_layer": 3})


def test_config_is_frozen_and_hashable():
  cfg = ModelConfig.preset("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 8
  assert hash(cfg) == hash(ModelConfig.preset("tiny"))
