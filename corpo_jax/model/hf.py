"""Hugging Face Mixtral checkpoints <-> corpo_jax parameters (safetensors; torch not needed).

Tensor layouts read:
* hub: per-expert `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` and
  `...block_sparse_moe.gate.weight` (Mixtral on the hub; transformers 5 `save_pretrained` default).
* fused: `model.layers.{l}.mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows),
  `...mlp.experts.down_proj` [E, D, F], `...mlp.gate.weight` (transformers 5 in memory;
  `save_pretrained(save_original_format=False)`).
`save_mixtral` writes the hub layout.

A thinking head (which HF Mixtral does not have) is written beside the Mixtral files:
`corpo_jax_thinking.json` holds its config fields (THINKING_FIELDS) and
`corpo_jax_thinking.safetensors` its parameters in our own layout, one tensor per leaf of
params["thinking"] named by its path ("layers.attn.q" [L_think, D, N, H], "norm.scale",
"step_head", and "lm_head" when it has its own). transformers ignores both files; `load_mixtral`
reads them back, so saving and loading a thinking model is exact.

Mapping (an HF nn.Linear weight is [out, in]; ours are [in, ...out]): q_proj [N*H, D] -> q [D, N, H]
(k, v alike), o_proj [D, N*H] -> o [N, H, D], gate.weight [E, D] -> router [D, E], w1 -> gate,
w3 -> up, w2 -> down (each transposed), lm_head.weight [V, D] -> lm_head [D, V], norm weights ->
scales. HF and `layers.rope` both use the half-split (`rotate_half`) RoPE convention, so q and k
need no permutation.

Loading reads one tensor slice at a time (`safe_open(...).get_slice`) straight into each device's
shard (`jax.make_array_from_callback`): a checkpoint is never materialised whole, on the host or on
one device.

One module (over 400 lines) because reading and writing must agree on every key name, transpose
and the thinking head's side file; the round-trip tests check both directions together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from corpo_jax.model import transformer
from corpo_jax.model.config import ModelConfig

THINKING_CONFIG, THINKING_TENSORS = "corpo_jax_thinking.json", "corpo_jax_thinking.safetensors"
THINKING_FIELDS = ("thinking_layers", "thinking_shared_unembed", "num_step_classes",
                   "think_start_id", "think_end_id")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_MAX_POSITIONS = 131072  # transformers' MixtralConfig defaults for fields a config.json may omit
_ROPE_THETA = 1e6
_AUX_LOSS_COEF = 0.001

# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
  """ModelConfig of a transformers MixtralConfig dict (config.json); params and compute in `dtype`.

  The result is a plain Mixtral (no thinking head, no think tokens) with dropless "sort" MoE
  dispatch, so it computes what transformers computes (switch to "capacity" with
  `dataclasses.replace` if wanted; capacity_factor >= num_experts / top_k never drops a token).
  HF's load-balancing loss is top_k times ours (see moe.py), so router_aux_loss_coef becomes
  load_balance_weight = coef * top_k; HF has no router z-loss (z_loss_weight = 0).
  router_jitter_noise (training-time input noise) is not modelled.
  """
  if hf.get("model_type", "mixtral") != "mixtral":
    raise ValueError(f"config.json model_type={hf['model_type']!r}: only 'mixtral' checkpoints "
                     f"can be loaded.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: Mixtral experts here are "
                     f"SwiGLU; only 'silu' is supported.")
  max_pos = int(hf.get("max_position_embeddings", _MAX_POSITIONS))
  window = hf.get("sliding_window")
  if window is not None and window < max_pos:
    raise ValueError(
        f"config.json sliding_window={window} < max_position_embeddings={max_pos}: corpo_jax "
        f"attends over the whole context. Set \"sliding_window\": null (exact for sequences of at "
        f"most {window} tokens) or max_position_embeddings <= {window}.")
  heads = _required(hf, "num_attention_heads")
  top_k = int(hf.get("num_experts_per_tok", 2))
  pad = hf.get("pad_token_id")
  return ModelConfig(
      vocab_size=_required(hf, "vocab_size"), d_model=_required(hf, "hidden_size"),
      num_layers=_required(hf, "num_hidden_layers"), num_heads=heads,
      num_kv_heads=_required(hf, "num_key_value_heads"),
      head_dim=int(hf.get("head_dim") or _required(hf, "hidden_size") // heads),
      d_ff=_required(hf, "intermediate_size"), num_experts=_required(hf, "num_local_experts"),
      top_k=top_k, rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      max_seq_len=max_pos, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      moe_dispatch="sort",
      load_balance_weight=float(hf.get("router_aux_loss_coef", _AUX_LOSS_COEF)) * top_k,
      z_loss_weight=0.0, thinking_layers=0, pad_id=-1 if pad is None else int(pad),
      think_start_id=-1, think_end_id=-1, dtype=dtype, param_dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json of a base (no thinking head) model, readable by transformers 4.x and 5.x."""
  assert not cfg.has_thinking_head
  return {
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "sliding_window": None, "num_local_experts": cfg.num_experts,
      "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.load_balance_weight / cfg.top_k,
      "tie_word_embeddings": cfg.tie_embeddings,
      "pad_token_id": cfg.pad_id if cfg.pad_id >= 0 else None, "dtype": cfg.param_dtype,
  }


def _required(hf: Mapping[str, Any], field: str) -> int:
  if hf.get(field) is None:
    raise ValueError(f"config.json has no {field!r}; add it (see transformers' MixtralConfig).")
  return int(hf[field])


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """Base frequency of default RoPE; any rope scaling (legacy or v5 field) is rejected."""
  theta = hf.get("rope_theta", _ROPE_THETA)
  for field in ("rope_scaling", "rope_parameters"):
    params = hf.get(field) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
      raise ValueError(f"config.json {field}={dict(params)}: only default RoPE is supported; "
                       f"use a checkpoint without rope scaling (rope_type 'default').")
    theta = params.get("rope_theta", theta)
  return float(theta)


# ----------------------------------------------------------------------------- tensor names


def _hf_shapes(cfg: ModelConfig, fused: bool) -> dict[str, tuple[int, ...]]:
  """Every tensor name of a checkpoint of `cfg` in the hub (or fused) layout, with its shape."""
  V, D, N, K, H = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  E, F = cfg.num_experts, cfg.d_ff
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for l in range(cfg.num_layers):
    p = f"model.layers.{l}."
    a = p + "self_attn."
    shapes.update({a + "q_proj.weight": (N * H, D), a + "k_proj.weight": (K * H, D),
                   a + "v_proj.weight": (K * H, D), a + "o_proj.weight": (D, N * H),
                   p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
    if fused:
      shapes.update({p + "mlp.gate.weight": (E, D), p + "mlp.experts.gate_up_proj": (E, 2 * F, D),
                     p + "mlp.experts.down_proj": (E, D, F)})
    else:
      shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
      for e in range(E):
        x = f"{p}block_sparse_moe.experts.{e}."
        shapes.update({x + "w1.weight": (F, D), x + "w3.weight": (F, D), x + "w2.weight": (D, F)})
  return shapes


def _ignored(name: str, cfg: ModelConfig) -> bool:
  """Tensors some checkpoints carry that hold nothing we need."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


# ----------------------------------------------------------------------------- reading


class _Checkpoint:
  """The safetensors files of one checkpoint directory, opened lazily; reads tensor slices."""

  def __init__(self, path: pathlib.Path, stack: contextlib.ExitStack):
    self._path, self._stack, self._open = path, stack, {}
    index = path / "model.safetensors.index.json"
    if index.exists():
      self.files = dict(json.loads(index.read_text())["weight_map"])
      return
    single = path / "model.safetensors"
    paths = [single] if single.exists() else sorted(
        p for p in path.glob("*.safetensors") if p.name != THINKING_TENSORS)
    if not paths:
      raise ValueError(f"No *.safetensors files in {path}; convert a PyTorch .bin checkpoint with "
                       f"transformers (from_pretrained, then save_pretrained).")
    self.files = {}
    for p in paths:
      for name in self._file(p.name).keys():
        if name in self.files:
          raise ValueError(f"Tensor {name!r} is in both {self.files[name]} and {p.name}; remove "
                           f"stale files or add a model.safetensors.index.json.")
        self.files[name] = p.name

  def _file(self, filename: str):
    if filename not in self._open:
      if not (self._path / filename).exists():
        raise ValueError(f"{self._path / filename} (named in the index) does not exist.")
      self._open[filename] = self._stack.enter_context(
          safe_open(str(self._path / filename), framework="numpy"))
    return self._open[filename]

  def _slice(self, name: str):
    return self._file(self.files[name]).get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._slice(name).get_dtype()

  def read(self, name: str, *index: slice) -> np.ndarray:
    return self._slice(name)[index]


def _check_tensors(ckpt: _Checkpoint, cfg: ModelConfig, fused: bool) -> None:
  expected = _hf_shapes(cfg, fused)
  missing = sorted(set(expected) - set(ckpt.files))
  if missing:
    raise ValueError(f"Checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                     f"{missing[:3]}; the files are incomplete or config.json does not match them.")
  unexpected = sorted(n for n in set(ckpt.files) - set(expected) if not _ignored(n, cfg))
  if unexpected:
    raise ValueError(f"Checkpoint has {len(unexpected)} tensor(s) a Mixtral of this config does "
                     f"not have, e.g. {unexpected[:3]}; is config.json the right one?")
  for name, shape in expected.items():
    if ckpt.shape(name) != shape:
      raise ValueError(f"Tensor {name!r} has shape {ckpt.shape(name)} but config.json implies "
                       f"{shape}; config.json does not match the tensors.")


Reader = Callable[[tuple[slice, ...]], np.ndarray]  # target index (concrete slices) -> block


def _span(s: slice) -> tuple[int, int]:
  return s.start, s.stop


def _transposed(ckpt: _Checkpoint, name: str) -> Reader:
  """[in, out] from an HF [out, in] matrix."""
  return lambda idx: ckpt.read(name, idx[1], idx[0]).T


def _in_heads(ckpt: _Checkpoint, name: str, H: int) -> Reader:
  """[D, N, H] from an HF [N*H, D] projection."""
  def read(idx):
    (n0, n1), d = _span(idx[1]), idx[0]
    w = ckpt.read(name, slice(n0 * H, n1 * H), d)
    return w.reshape(n1 - n0, H, -1)[:, idx[2], :].transpose(2, 0, 1)
  return read


def _out_heads(ckpt: _Checkpoint, name: str, H: int) -> Reader:
  """[N, H, D] from an HF [D, N*H] projection."""
  def read(idx):
    n0, n1 = _span(idx[0])
    w = ckpt.read(name, idx[2], slice(n0 * H, n1 * H))
    return w.reshape(-1, n1 - n0, H)[:, :, idx[1]].transpose(1, 2, 0)
  return read


def _per_expert(ckpt: _Checkpoint, name_of: Callable[[int], str]) -> Reader:
  """[E, in, out] from E HF [out, in] matrices."""
  return lambda idx: np.stack([ckpt.read(name_of(e), idx[2], idx[1]).T
                               for e in range(*_span(idx[0]))])


def _fused(ckpt: _Checkpoint, name: str, offset: int) -> Reader:
  """[E, in, out] from an HF [E, out, in] tensor, output rows from `offset` on."""
  def read(idx):
    o0, o1 = _span(idx[2])
    return ckpt.read(name, idx[0], slice(offset + o0, offset + o1), idx[1]).transpose(0, 2, 1)
  return read


def _direct(ckpt: _Checkpoint, name: str) -> Reader:
  return lambda idx: ckpt.read(name, *idx)


def _stacked(layer_reader: Callable[[int], Reader]) -> Reader:
  """[L, ...] from one reader per layer."""
  return lambda idx: np.stack([layer_reader(l)(idx[1:]) for l in range(*_span(idx[0]))])


def _readers(ckpt: _Checkpoint, cfg: ModelConfig, fused: bool) -> dict[tuple[str, ...], Reader]:
  """A reader for every leaf of our params tree (flattened paths)."""
  H, F = cfg.head_dim, cfg.d_ff
  at = lambda l, s: f"model.layers.{l}.{s}"
  readers = {("embed",): _direct(ckpt, "model.embed_tokens.weight"),
             ("final_norm", "scale"): _direct(ckpt, "model.norm.weight")}
  if not cfg.tie_embeddings:
    readers[("lm_head",)] = _transposed(ckpt, "lm_head.weight")
  per_layer = {
      ("attn", "q"): lambda l: _in_heads(ckpt, at(l, "self_attn.q_proj.weight"), H),
      ("attn", "k"): lambda l: _in_heads(ckpt, at(l, "self_attn.k_proj.weight"), H),
      ("attn", "v"): lambda l: _in_heads(ckpt, at(l, "self_attn.v_proj.weight"), H),
      ("attn", "o"): lambda l: _out_heads(ckpt, at(l, "self_attn.o_proj.weight"), H),
      ("attn_norm", "scale"): lambda l: _direct(ckpt, at(l, "input_layernorm.weight")),
      ("moe_norm", "scale"): lambda l: _direct(ckpt, at(l, "post_attention_layernorm.weight")),
  }
  if fused:
    per_layer.update({
        ("moe", "router"): lambda l: _transposed(ckpt, at(l, "mlp.gate.weight")),
        ("moe", "gate"): lambda l: _fused(ckpt, at(l, "mlp.experts.gate_up_proj"), 0),
        ("moe", "up"): lambda l: _fused(ckpt, at(l, "mlp.experts.gate_up_proj"), F),
        ("moe", "down"): lambda l: _fused(ckpt, at(l, "mlp.experts.down_proj"), 0),
    })
  else:
    expert = lambda l, w: lambda e: at(l, f"block_sparse_moe.experts.{e}.{w}.weight")
    per_layer.update({
        ("moe", "router"): lambda l: _transposed(ckpt, at(l, "block_sparse_moe.gate.weight")),
        ("moe", "gate"): lambda l: _per_expert(ckpt, expert(l, "w1")),
        ("moe", "up"): lambda l: _per_expert(ckpt, expert(l, "w3")),
        ("moe", "down"): lambda l: _per_expert(ckpt, expert(l, "w2")),
    })
  readers.update({("layers",) + k: _stacked(v) for k, v in per_layer.items()})
  return readers


def load_mixtral(path: str | pathlib.Path, *, dtype: str | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a transformers Mixtral checkpoint directory.

  path: config.json plus model.safetensors, or shards with model.safetensors.index.json (either
  tensor layout, see the module docstring), and a thinking head's files if `save_mixtral` wrote
  one. dtype: parameter and compute dtype (default: the
  checkpoint's). mesh: place every parameter directly into its sharding (`param_shardings`);
  each device reads only its own slice. Without a mesh, params live on the default device.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise ValueError(f"{path} has no config.json; pass a transformers checkpoint directory.")
  hf = json.loads((path / "config.json").read_text())
  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(path, stack)
    cfg = config_from_hf(hf)
    fused = "model.layers.0.mlp.experts.gate_up_proj" in ckpt.files
    _check_tensors(ckpt, cfg, fused)
    dtype = dtype or _checkpoint_dtype(ckpt)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, **thinking_config(path))
    readers = _readers(ckpt, cfg, fused)
    if cfg.has_thinking_head:
      head = stack.enter_context(safe_open(str(path / THINKING_TENSORS), framework="numpy"))
      for name in head.keys():
        readers[("thinking",) + tuple(name.split("."))] = (
            lambda idx, name=name: head.get_slice(name)[idx])
    abstract = traverse_util.flatten_dict(nn.unbox(transformer.abstract_params(cfg)))
    if set(abstract) != set(readers):
      raise ValueError(f"{path / THINKING_TENSORS} does not match {THINKING_CONFIG}: tensors "
                       f"{sorted('.'.join(k) for k in set(abstract) ^ set(readers))[:3]} differ.")
    if mesh is None:
      shardings = dict.fromkeys(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
      shardings = traverse_util.flatten_dict(transformer.param_shardings(cfg, mesh))
    params = {k: _materialise(readers[k], v.shape, v.dtype, shardings[k])
              for k, v in abstract.items()}
  return cfg, traverse_util.unflatten_dict(params)


def thinking_config(path: str | pathlib.Path) -> dict[str, Any]:
  """The thinking head's ModelConfig fields saved beside a checkpoint ({} when it has none)."""
  path = pathlib.Path(path) / THINKING_CONFIG
  if not path.exists():
    return {}
  fields = json.loads(path.read_text())
  if set(fields) != set(THINKING_FIELDS) or not (path.parent / THINKING_TENSORS).exists():
    raise ValueError(f"{path} must hold exactly the fields {THINKING_FIELDS}, beside "
                     f"{THINKING_TENSORS}; rewrite both with corpo_jax.model.hf.save_mixtral.")
  return fields


def _checkpoint_dtype(ckpt: _Checkpoint) -> str:
  code = ckpt.dtype("model.embed_tokens.weight")
  if code not in _SAFETENSORS_DTYPES:
    raise ValueError(f"Checkpoint dtype {code} has no default here; pass load_mixtral(..., dtype=) "
                     f"one of {sorted(_SAFETENSORS_DTYPES.values())}.")
  return _SAFETENSORS_DTYPES[code]


def _materialise(read: Reader, shape: tuple[int, ...], dtype: Any,
                 sharding: jax.sharding.Sharding) -> jax.Array:
  def block(index):
    idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    return np.asarray(read(idx), dtype=dtype)
  return jax.make_array_from_callback(shape, sharding, block)


# ----------------------------------------------------------------------------- writing


def _hf_tensors(params: Any,
                cfg: ModelConfig) -> Iterator[tuple[str, Any, Callable[[], np.ndarray]]]:
  """(hub-layout name, source leaf, thunk giving the host array), in checkpoint order; a thunk
  fetches only its own slice of the leaf."""
  host = lambda x: np.asarray(jax.device_get(x))
  layers, attn, moe = params["layers"], params["layers"]["attn"], params["layers"]["moe"]
  N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
  yield "model.embed_tokens.weight", params["embed"], lambda: host(params["embed"])
  for l in range(cfg.num_layers):
    p = f"model.layers.{l}."
    for w in "qkv":
      yield (p + f"self_attn.{w}_proj.weight", attn[w],
             lambda w=w, l=l: host(attn[w][l]).transpose(1, 2, 0).reshape(-1, D))
    yield (p + "self_attn.o_proj.weight", attn["o"],
           lambda l=l: host(attn["o"][l]).reshape(N * H, D).T)
    for hf_name, norm in (("input_layernorm", "attn_norm"),
                          ("post_attention_layernorm", "moe_norm")):
      scale = layers[norm]["scale"]
      yield p + hf_name + ".weight", scale, lambda scale=scale, l=l: host(scale[l])
    yield p + "block_sparse_moe.gate.weight", moe["router"], lambda l=l: host(moe["router"][l]).T
    for e in range(cfg.num_experts):
      for hf_name, ours in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
        yield (f"{p}block_sparse_moe.experts.{e}.{hf_name}.weight", moe[ours],
               lambda ours=ours, l=l, e=e: host(moe[ours][l, e]).T)
  scale = params["final_norm"]["scale"]
  yield "model.norm.weight", scale, lambda: host(scale)
  if not cfg.tie_embeddings:
    yield "lm_head.weight", params["lm_head"], lambda: host(params["lm_head"]).T


def save_mixtral(params: Any, cfg: ModelConfig, path: str | pathlib.Path, *,
                 base_only: bool = False, max_shard_bytes: int = 5 * 10**9,
                 extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes config.json and safetensors (hub layout) readable by transformers and `load_mixtral`.

  Files: model.safetensors, or model-0000i-of-0000n.safetensors plus
  model.safetensors.index.json when the tensors exceed `max_shard_bytes`; a thinking head's two
  files beside them (module docstring). Tensors keep the params' dtype and are fetched from the
  devices one at a time. base_only: leave a thinking head out. extra_config: more config.json
  fields ModelConfig does not carry (e.g. bos_token_id / eos_token_id).
  """
  _check_params(params, cfg)
  head = params.get("thinking") if cfg.has_thinking_head and not base_only else None
  if cfg.has_thinking_head:
    params = {k: v for k, v in params.items() if k != "thinking"}
    cfg_head, cfg = cfg, dataclasses.replace(cfg, thinking_layers=0)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if list(path.glob("*.safetensors")):
    raise ValueError(f"{path} already holds *.safetensors files; save into an empty directory.")

  shapes = _hf_shapes(cfg, fused=False)
  shards, current, used, total = [], [], 0, 0
  for name, leaf, thunk in _hf_tensors(params, cfg):
    size = math.prod(shapes[name]) * np.dtype(leaf.dtype).itemsize
    if current and used + size > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append((name, thunk))
    used += size
    total += size
  shards.append(current)

  weight_map = {}
  for i, shard in enumerate(shards):
    filename = ("model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    arrays = {}
    for name, thunk in shard:
      arrays[name] = np.ascontiguousarray(thunk())
      assert arrays[name].shape == shapes[name], (name, arrays[name].shape)
      weight_map[name] = filename
    save_file(arrays, str(path / filename), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  hf = {**config_to_hf(cfg), **(extra_config or {})}
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  if head is not None:
    flat = traverse_util.flatten_dict(head)
    save_file({".".join(k): np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()},
              str(path / THINKING_TENSORS), metadata={"format": "corpo_jax"})
    fields = {f: getattr(cfg_head, f) for f in THINKING_FIELDS}
    (path / THINKING_CONFIG).write_text(json.dumps(fields, indent=2))


def _check_params(params: Any, cfg: ModelConfig) -> None:
  expected = traverse_util.flatten_dict(nn.unbox(transformer.abstract_params(cfg)))
  got = traverse_util.flatten_dict(params)
  if set(got) != set(expected):
    raise ValueError(f"params do not match cfg: leaves {sorted(set(got) ^ set(expected))[:3]} "
                     f"differ; pass the cfg the params were created with.")
  for k, v in expected.items():
    if tuple(got[k].shape) != tuple(v.shape):
      raise ValueError(f"params[{'/'.join(k)}] has shape {tuple(got[k].shape)} but cfg implies "
                       f"{tuple(v.shape)}; pass the cfg the params were created with.")
