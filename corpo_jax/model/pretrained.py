"""A pretrained Hugging Face Mixtral as the start of a run (`config.init_from`).

Which fields come from where. The checkpoint's config.json fixes the architecture
(CHECKPOINT_FIELDS: shapes, RoPE base, norm epsilon, context length, tied embeddings), and a
thinking head saved beside it (model/hf.py) fixes the head's fields. Everything else is a training
choice and comes from the run's config.model: MoE dispatch and capacity, aux-loss weights,
compute and parameter dtypes, remat, and a thinking head to add (`thinking_layers`).

Vocabulary. The tokenizer appends the pieces it needs (<think>, </think>, a pad) after the
checkpoint's last piece, so the embedding and the unembedding grow by those rows; `new_token_init`
sets them to the mean of the existing rows ("mean", which keeps each new token's probability at
most the average token's, by Jensen's inequality: exp(h . mean_v w_v) <= mean_v exp(h . w_v)) or
to zeros. Every existing row is unchanged, so logits over the pretrained vocabulary equal the
checkpoint's; the log-softmax normaliser also counts the new tokens' mass.

A thinking head added to a pretrained base starts equal to the base head: its layers are copies
of the top `thinking_layers` base layers with their output projections (attention `o`, expert
`down`) set to zero, so each layer adds nothing to the residual stream at first; its final norm
is the base's final norm, its own unembedding (if any) the base's; the step classifier is random.
Gradients still reach every copied weight after the first update (the output projections' gradient
is not zero), and the RL reference (the stage's starting policy) is then the pretrained model.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from corpo_jax.model import hf, transformer
from corpo_jax.model.config import ModelConfig

CHECKPOINT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "d_ff", "num_experts", "top_k", "rope_theta", "norm_eps",
                     "max_seq_len", "tie_embeddings")
NEW_TOKEN_INITS = ("mean", "zeros")


def checkpoint_fields(path: str | pathlib.Path) -> dict[str, Any]:
  """The ModelConfig fields a checkpoint directory fixes (module doc), from its config files."""
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise ValueError(f"--config.init_from={str(path)!r} has no config.json; pass a Hugging Face "
                     f"Mixtral directory (config.json, *.safetensors, tokenizer.model).")
  cfg = hf.config_from_hf(json.loads((path / "config.json").read_text()))
  return {**{f: getattr(cfg, f) for f in CHECKPOINT_FIELDS}, **hf.thinking_config(path)}


def load(path: str | pathlib.Path, cfg: ModelConfig, mesh: jax.sharding.Mesh | None, *,
         new_token_ids: Sequence[int], existing_rows: int, new_token_init: str,
         rng: jax.Array) -> Any:
  """The run's starting params: the checkpoint read straight into `cfg`'s shardings, its
  vocabulary grown to cfg.vocab_size with rows `new_token_ids` initialised by `new_token_init`
  from the mean of rows [0, existing_rows), and a thinking head added when cfg has one that the
  checkpoint lacks."""
  if new_token_init not in NEW_TOKEN_INITS:
    raise ValueError(f"config.new_token_init={new_token_init!r} is not one of {NEW_TOKEN_INITS}.")
  hf_cfg, params = hf.load_mixtral(path, dtype=cfg.param_dtype, mesh=mesh)
  add_head = cfg.has_thinking_head and not hf_cfg.has_thinking_head
  if add_head and cfg.thinking_layers > cfg.num_layers:
    raise ValueError(f"model.thinking_layers={cfg.thinking_layers} > the checkpoint's "
                     f"num_layers={cfg.num_layers}: the head starts as copies of the top base "
                     f"layers; use at most {cfg.num_layers}.")
  if hf_cfg.has_thinking_head and not cfg.has_thinking_head:
    params = {k: v for k, v in params.items() if k != "thinking"}

  def adapt(kept, vocab, rng):
    params = grow_vocab({**kept, **vocab}, cfg.vocab_size, new_token_ids, existing_rows,
                        new_token_init)
    if add_head:
      params["thinking"] = thinking_head_like_base(params, cfg, rng)
    return params

  # The layers keep their shapes and are donated (updated in place); the vocabulary leaves grow.
  vocab = {k: params.pop(k) for k in ("embed", "lm_head") if k in params}
  shardings = None if mesh is None else transformer.param_shardings(cfg, mesh)
  return jax.jit(adapt, out_shardings=shardings, donate_argnums=0)(params, vocab, rng)


def grow_vocab(params: Any, vocab_size: int, new_ids: Sequence[int], existing_rows: int,
               init: str) -> Any:
  """Embedding [V0, D] and unembedding [D, V0] grown to `vocab_size`, rows `new_ids` set to the
  mean of rows [0, existing_rows) ("mean") or to zeros; the other rows unchanged."""
  ids = jnp.asarray(list(new_ids), jnp.int32)

  def grow_rows(w_VD):
    fill_D = (jnp.mean(w_VD[:existing_rows].astype(jnp.float32), axis=0) if init == "mean"
              else jnp.zeros(w_VD.shape[1:], jnp.float32))
    w_VD = jnp.pad(w_VD, ((0, vocab_size - w_VD.shape[0]), (0, 0)))
    return w_VD.at[ids].set(fill_D.astype(w_VD.dtype))

  grow_columns = lambda w_DV: grow_rows(w_DV.T).T
  out = dict(params, embed=grow_rows(params["embed"]))
  if "lm_head" in out:
    out["lm_head"] = grow_columns(out["lm_head"])
  if "lm_head" in out.get("thinking", {}):
    out["thinking"] = dict(out["thinking"], lm_head=grow_columns(out["thinking"]["lm_head"]))
  return out


def thinking_head_like_base(params: Any, cfg: ModelConfig, rng: jax.Array) -> Any:
  """Thinking-head params that make the head's logits equal the base head's (module doc)."""
  top = cfg.num_layers - cfg.thinking_layers
  layers = jax.tree.map(lambda x: x[top:], params["layers"])
  layers["attn"]["o"] = jnp.zeros_like(layers["attn"]["o"])
  layers["moe"]["down"] = jnp.zeros_like(layers["moe"]["down"])
  fresh = transformer.init_params(cfg, rng)["thinking"]  # jit drops all but the step head
  head = {"layers": layers, "norm": params["final_norm"], "step_head": fresh["step_head"]}
  if not cfg.thinking_shared_unembed:
    head["lm_head"] = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return head
