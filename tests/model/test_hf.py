"""HF Mixtral interop: logit parity with transformers, exact round trips, both tensor layouts,
sharded loading, and the errors users get for what we do not support."""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

_NEEDS_HF = "HF interop tests need the `hf` extra (torch, transformers): pip install -e .[hf]"
torch = pytest.importorskip("torch", reason=_NEEDS_HF)
transformers = pytest.importorskip("transformers", reason=_NEEDS_HF)
from safetensors.numpy import load_file, save_file  # noqa: E402  (installed with transformers)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from corpo_jax import model, sharding  # noqa: E402
from corpo_jax.model import hf  # noqa: E402
from corpo_jax.model.config import ModelConfig  # noqa: E402

LENGTHS = (12, 7, 3)  # right-padded batch with several sequence lengths
VOCAB, E, F, L = 128, 4, 96, 2


def _hf_model():
  """A random tiny transformers Mixtral, weights rescaled so logits and routing are O(1)."""
  torch.manual_seed(0)
  config = transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=64, num_hidden_layers=L, num_attention_heads=4,
      num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, intermediate_size=F,
      sliding_window=None, max_position_embeddings=256, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 1e4}, router_aux_loss_coef=0.02,
      attn_implementation="eager")
  hf_model = transformers.MixtralForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      if p.ndim == 1:  # RMSNorm weights: not all ones, so a mix-up of norms shows
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5)
  return hf_model


def _hf_outputs(hf_model, tokens_BT, mask_BT, **kwargs):
  with torch.no_grad():
    return hf_model(torch.tensor(tokens_BT), attention_mask=torch.tensor(mask_BT.astype(np.int64)),
                    **kwargs)


def _flat(params):
  return traverse_util.flatten_dict(params)


def _assert_identical(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The HF model, its hub-layout and fused-layout directories, a batch and the HF logits."""
  root = tmp_path_factory.mktemp("hf")
  hf_model = _hf_model()
  hf_model.save_pretrained(root / "hub")  # transformers 5 default: the original hub layout
  hf_model.save_pretrained(root / "fused", save_original_format=False)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, VOCAB, (len(LENGTHS), max(LENGTHS)))
  mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
  tokens = np.where(mask, tokens, 0)
  out = _hf_outputs(hf_model, tokens, mask, output_router_logits=True)
  torch_mask = torch.tensor(mask.astype(np.int64))
  load_balance = [float(load_balancing_loss_func((r,), E, 2, torch_mask))
                  for r in out.router_logits]
  return dict(root=root, hf_model=hf_model, tokens=tokens, mask=mask, ref=out.logits.numpy(),
              hf_load_balance=load_balance)


def test_saved_layouts_are_as_documented(setup):
  names = lambda d: set(load_file(str(setup["root"] / d / "model.safetensors")))
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names("hub")
  assert "model.layers.1.mlp.experts.gate_up_proj" in names("fused")


def test_config_from_hf(setup):
  cfg, _ = hf.load_mixtral(setup["root"] / "hub")
  assert cfg == ModelConfig(
      vocab_size=VOCAB, d_model=64, num_layers=L, num_heads=4, num_kv_heads=2, head_dim=16,
      d_ff=F, num_experts=E, top_k=2, rope_theta=1e4, norm_eps=1e-6, max_seq_len=256,
      tie_embeddings=False, moe_dispatch="sort", load_balance_weight=0.04, z_loss_weight=0.0,
      thinking_layers=0, pad_id=-1, think_start_id=-1, think_end_id=-1)


# config.json of mistralai/Mixtral-8x7B-v0.1 (legacy top-level rope_theta, transformers 4.36).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_mixtral_8x7b_config_matches_preset():
  cfg = hf.config_from_hf(MIXTRAL_8X7B, "bfloat16")
  structure = lambda c: (c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.num_kv_heads,
                         c.head_dim, c.d_ff, c.num_experts, c.top_k, c.rope_theta, c.norm_eps,
                         c.max_seq_len, c.tie_embeddings, c.pad_id, c.think_start_id)
  assert structure(cfg) == structure(ModelConfig.preset("mixtral_8x7b"))
  assert cfg.load_balance_weight == 0.04 and cfg.dtype == cfg.param_dtype == "bfloat16"


@pytest.mark.parametrize("dispatch", ["sort", "capacity"])
def test_parity_with_transformers(setup, dispatch):
  """Logits on real positions, and the load-balancing loss: per layer HF's is top_k times ours
  (moe.py), and ours is the mean over layers. Both layouts load bit-identically
  (test_all_layouts_load_identically), so one suffices here."""
  cfg, params = hf.load_mixtral(setup["root"] / "hub")
  cfg = dataclasses.replace(cfg, moe_dispatch=dispatch, capacity_factor=E / cfg.top_k)  # dropless
  tokens, mask, ref = jnp.asarray(setup["tokens"]), jnp.asarray(setup["mask"]), setup["ref"]
  out = model.run(params, cfg, tokens, mask)
  logits = np.asarray(model.project(params, cfg, out.hidden))
  assert ref[setup["mask"]].std() > 0.5  # the 1e-4 tolerance is meaningful at this scale
  diff = np.abs(logits - ref)[setup["mask"]].max()
  print(f"max |logits - transformers| ({dispatch}) = {diff:.3g}")
  assert diff < 1e-4
  np.testing.assert_allclose(float(out.aux["load_balance_loss"]),
                             np.mean(setup["hf_load_balance"]) / cfg.top_k, rtol=1e-5)


def _write_hub_by_hand(hf_model, path, drop=None):
  """The original per-expert hub layout written from the in-memory (fused) state dict, split
  over two files with an index; independent of transformers' own conversion on save."""
  hub = {}
  for name, t in hf_model.state_dict().items():
    a = t.numpy()
    if ".mlp.experts.gate_up_proj" in name:
      prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
      for e in range(E):
        hub[f"{prefix}{e}.w1.weight"], hub[f"{prefix}{e}.w3.weight"] = a[e, :F], a[e, F:]
    elif ".mlp.experts.down_proj" in name:
      prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
      for e in range(E):
        hub[f"{prefix}{e}.w2.weight"] = a[e]
    else:
      hub[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = a
  hub.pop(drop, None)
  os.makedirs(path)
  names = sorted(hub)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    filename = f"part{i}.safetensors"
    save_file({n: np.ascontiguousarray(hub[n]) for n in part}, str(path / filename),
              metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, filename))
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))


def test_all_layouts_load_identically(setup, tmp_path):
  _write_hub_by_hand(setup["hf_model"], tmp_path / "by_hand")
  _, by_hand = hf.load_mixtral(tmp_path / "by_hand")
  _, hub = hf.load_mixtral(setup["root"] / "hub")
  _, fused = hf.load_mixtral(setup["root"] / "fused")
  _assert_identical(by_hand, hub)
  _assert_identical(by_hand, fused)
  # Spot-check the mapping against the torch tensors themselves.
  moe = setup["hf_model"].model.layers[1].mlp
  np.testing.assert_array_equal(np.asarray(hub["layers"]["moe"]["up"][1, 3]),
                                moe.experts.gate_up_proj[3, F:].detach().numpy().T)
  np.testing.assert_array_equal(np.asarray(hub["layers"]["moe"]["router"][1]),
                                moe.gate.weight.detach().numpy().T)


@pytest.mark.parametrize("max_shard_bytes", [5 * 10**9, 100_000])
def test_round_trip_is_exact(setup, tmp_path, max_shard_bytes):
  cfg, params = hf.load_mixtral(setup["root"] / "hub")
  hf.save_mixtral(params, cfg, tmp_path, max_shard_bytes=max_shard_bytes)
  files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  if max_shard_bytes == 100_000:  # ~0.6 MB of tensors: several files and an index
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").exists()
  else:
    assert files == ["model.safetensors"]
  cfg2, params2 = hf.load_mixtral(tmp_path)
  assert cfg2 == cfg
  _assert_identical(params2, params)
  reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
  logits = _hf_outputs(reloaded.float().eval(), setup["tokens"], setup["mask"]).logits.numpy()
  np.testing.assert_array_equal(logits, setup["ref"])


def test_sharded_load_places_params_in_their_shardings(setup, tmp_path):
  mesh = sharding.make_mesh((1, 2, 2, 2))
  cfg, params = hf.load_mixtral(setup["root"] / "hub")
  _, sharded = hf.load_mixtral(setup["root"] / "hub", mesh=mesh)
  _assert_identical(sharded, params)
  expected = _flat(model.param_shardings(cfg, mesh))
  for k, x in _flat(sharded).items():
    assert x.sharding.is_equivalent_to(expected[k], x.ndim), k
  gate = sharded["layers"]["moe"]["gate"]  # [L, E, D, F] over (-, expert, fsdp, tensor)
  assert gate.addressable_shards[0].data.shape == (L, E // 2, 32, F // 2)
  hf.save_mixtral(sharded, cfg, tmp_path)  # saving sharded params writes the same tensors
  _assert_identical(hf.load_mixtral(tmp_path)[1], params)


def test_dtype_argument(setup):
  _, f32 = hf.load_mixtral(setup["root"] / "hub")
  cfg, bf16 = hf.load_mixtral(setup["root"] / "hub", dtype="bfloat16")
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
  _assert_identical(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32))


def _random_params(cfg):
  """O(1)-scale random params of `cfg` (cheaper than compiling `model.init_params`)."""
  rng = np.random.RandomState(0)
  def one(path, leaf):
    if path[-1].key == "scale":
      return jnp.asarray(1 + 0.2 * rng.randn(*leaf.shape), jnp.float32)
    return jnp.asarray(0.15 * rng.randn(*leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(one, flax.linen.unbox(model.abstract_params(cfg)))


@pytest.mark.parametrize("tie,shared", [(False, True), (True, True), (False, False)])
def test_thinking_model_round_trip(tmp_path, tie, shared):
  """The base goes out as Mixtral, the head beside it; loading both back is exact."""
  cfg = ModelConfig.preset("tiny", tie_embeddings=tie, thinking_shared_unembed=shared)
  params = _random_params(cfg)
  hf.save_mixtral(params, cfg, tmp_path / "all")
  cfg2, params2 = hf.load_mixtral(tmp_path / "all")
  fields = lambda c: {f: getattr(c, f) for f in hf.THINKING_FIELDS + ("tie_embeddings", "pad_id")}
  assert fields(cfg2) == fields(cfg) and cfg2.thinking_layers == 1
  _assert_identical(params2, params)
  hf.save_mixtral(params, cfg, tmp_path / "base", base_only=True)
  cfg3, params3 = hf.load_mixtral(tmp_path / "base")
  assert cfg3.thinking_layers == 0 and cfg3.tie_embeddings == tie
  _assert_identical(params3, {k: v for k, v in params.items() if k != "thinking"})
  # transformers reads it too (a tied checkpoint has no lm_head.weight; HF ties it to embed).
  hf_model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "all")
  assert hf_model.config.tie_word_embeddings == tie
  np.testing.assert_array_equal(hf_model.lm_head.weight.detach().numpy(),
                                np.asarray(params["embed"] if tie else params["lm_head"].T))


def test_missing_tensor_is_named(setup, tmp_path):
  missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
  _write_hub_by_hand(setup["hf_model"], tmp_path / "ckpt", drop=missing)
  with pytest.raises(ValueError, match=missing):
    hf.load_mixtral(tmp_path / "ckpt")


@pytest.mark.parametrize("change, field", [
    ({"sliding_window": 64}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": None}, "num_key_value_heads"),
    ({"intermediate_size": 80}, "shape"),
    ({"model_type": "llama"}, "model_type"),
])
def test_unsupported_config_is_rejected(setup, tmp_path, change, field):
  config = json.loads((setup["root"] / "hub" / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  os.symlink(setup["root"] / "hub" / "model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=field):
    hf.load_mixtral(tmp_path)


def test_save_errors(setup, tmp_path):
  cfg, params = hf.load_mixtral(setup["root"] / "hub")
  with pytest.raises(ValueError, match="cfg"):
    hf.save_mixtral(params, dataclasses.replace(cfg, d_ff=F + 8), tmp_path / "a")
  hf.save_mixtral(params, cfg, tmp_path / "b")
  with pytest.raises(ValueError, match="empty directory"):
    hf.save_mixtral(params, cfg, tmp_path / "b")
