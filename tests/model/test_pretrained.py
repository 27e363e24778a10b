"""Starting from a pretrained model: vocabulary growth and a thinking head that starts equal to
the base head (corpo_jax/model/pretrained.py). The end-to-end run from a Hugging Face checkpoint
is tests/test_export.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corpo_jax import model
from corpo_jax.model import pretrained
from corpo_jax.model.config import ModelConfig

BASE = ModelConfig.preset("tiny", vocab_size=60, num_layers=2, thinking_layers=0)
forward = jax.jit(model.forward, static_argnums=1)


def _params(cfg, seed=0):
  return model.init_params(cfg, jax.random.key(seed))


def test_grow_vocab_keeps_rows_and_fills_new_ones():
  embed = jnp.arange(8.0).reshape(4, 2)
  params = {"embed": embed, "lm_head": embed.T * 10}
  grown = pretrained.grow_vocab(params, 6, [4, 5], 4, "mean")
  np.testing.assert_array_equal(grown["embed"], [[0, 1], [2, 3], [4, 5], [6, 7], [3, 4], [3, 4]])
  np.testing.assert_array_equal(grown["lm_head"], np.asarray(grown["embed"]).T * 10)
  # A padded checkpoint vocabulary (rows past the tokenizer's pieces): the added id 3 is refilled
  # from the mean of the pieces' rows only; nothing else moves.
  padded = pretrained.grow_vocab(params, 4, [3], 3, "zeros")
  np.testing.assert_array_equal(padded["embed"], [[0, 1], [2, 3], [4, 5], [0, 0]])
  np.testing.assert_array_equal(pretrained.grow_vocab(params, 5, [4], 2, "mean")["embed"][4], [1, 2])


@pytest.mark.parametrize("shared", [True, False])
def test_added_thinking_head_starts_equal_to_the_base_head(shared):
  """A base model plus a thinking head made by thinking_head_like_base gives the base model's
  logits everywhere, inside think spans too (where the head's logits are used)."""
  cfg = dataclasses.replace(BASE, thinking_layers=1, thinking_shared_unembed=shared)
  base = _params(BASE)
  params = {**base, "thinking": pretrained.thinking_head_like_base(base, cfg, jax.random.key(1))}
  S, E = cfg.think_start_id, cfg.think_end_id
  tokens = jnp.asarray([[9, S, 11, 12, 13, E, 14, 15], [20, 21, S, 22, E, 23, S, 24]])
  assert model.think_mask(tokens, tokens >= 0, cfg).sum() == 8  # the head is in use
  np.testing.assert_allclose(forward(params, cfg, tokens), forward(base, BASE, tokens),
                             atol=1e-6, rtol=0)
  head = params["thinking"]["layers"]
  np.testing.assert_array_equal(head["attn"]["q"], base["layers"]["attn"]["q"][1:])  # top layer
  assert not np.asarray(head["attn"]["o"]).any() and not np.asarray(head["moe"]["down"]).any()
  # The copied layers still learn: the loss gradient of the zeroed projections is not zero.
  grad = jax.jit(jax.grad(lambda p: model.forward(p, cfg, tokens)[:, :, 7].sum()))(params)
  assert float(jnp.abs(grad["thinking"]["layers"]["attn"]["o"]).max()) > 1e-3


def test_too_deep_a_head_is_refused(tmp_path):
  from corpo_jax.model import hf  # noqa: PLC0415  (safetensors comes with the base install)
  hf.save_mixtral(_params(BASE), BASE, tmp_path)
  cfg = dataclasses.replace(BASE, thinking_layers=3)
  with pytest.raises(ValueError, match="thinking_layers=3 > the checkpoint's num_layers=2"):
    pretrained.load(tmp_path, cfg, None, new_token_ids=[], existing_rows=60,
                    new_token_init="mean", rng=jax.random.key(0))
  with pytest.raises(ValueError, match="new_token_init='median'"):
    pretrained.load(tmp_path, BASE, None, new_token_ids=[], existing_rows=60,
                    new_token_init="median", rng=jax.random.key(0))
  with pytest.raises(ValueError, match="has no config.json"):
    pretrained.checkpoint_fields(tmp_path / "nowhere")
