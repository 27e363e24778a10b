import pytest

from configs import grpo, gspo
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import setup as setup_lib


def test_from_dict_round_trip_and_freeze_list():
  cfg = RLConfig.from_dict({"advantage": "corpo", "scale": "batch", "tau": 0.5,
                            "freeze": ["base", "thinking/step_head"]})
  assert cfg.freeze == ("base", "thinking/step_head") and cfg.tau == 0.5
  assert RLConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields, match", [
    ({"advantage": "corpo", "scale": "group"}, "use scale=none or batch"),
    ({"advantage": "static", "scale": "group"}, "use scale=none or batch"),
    ({"advantage": "dr_grpo", "scale": "group"}, "use scale=none"),
    ({"advantage": "ppo"}, r"rl.advantage='ppo' is not one of \('grpo', 'dr_grpo', 'rloo', 'static', 'corpo'\)"),
    ({"aggregation": "mean"}, "rl.aggregation"),
    ({"kl_estimator": "k4"}, "rl.kl_estimator"),
    ({"importance_level": "seq"}, "rl.importance_level"),
    ({"eps_low": 1.0}, "rl.eps_low"),
    ({"num_micro_batches": 0}, "rl.num_micro_batches"),
    ({"temperature": 0.0}, "rl.temperature"),
    ({"overlong_penalty": True, "overlong_buffer": 100, "max_completion_len": 64}, "rl.overlong_buffer"),
    ({"freeze": "base"}, r"tuple of patterns, e.g. \('base',\)"),
    ({"freeze": ("layers/(",)}, "not a valid regex"),
])
def test_bad_values_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    RLConfig(**fields)


def test_unknown_keys_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown rl config field\(s\) \['lr'\]; valid fields: .*'learning_rate'"):
    RLConfig.from_dict({"lr": 1e-3})


def test_gspo_preset_clips_the_sequence_ratio_at_the_papers_range():
  config = gspo.get_config()
  for name in ("rl", "specialize"):
    cfg = setup_lib.rl_config(config, name)
    assert (cfg.advantage, cfg.scale, cfg.importance_level) == ("grpo", "group", "sequence")
    assert (cfg.eps_low, cfg.eps_high) == (3e-4, 4e-4)
  assert config.workdir == "workdir/gspo"
  assert setup_lib.rl_config(grpo.get_config(), "rl").eps_high == 0.2  # token-level presets keep 0.2

