"""A pretrained model in and out: `--config.init_from` runs sft -> rl from a random transformers
Mixtral with a Llama-style tokenizer (unk 0, bos 1, eos 2, no pad), then `corpo_jax.export`
writes the trained policy back for transformers and for `--config.init_from`. No downloads."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_NEEDS_HF = "HF interop tests need the `hf` extra (torch, transformers): pip install -e .[hf]"
torch = pytest.importorskip("torch", reason=_NEEDS_HF)
transformers = pytest.importorskip("transformers", reason=_NEEDS_HF)

from configs import pretrained  # noqa: E402
from corpo_jax import export, model  # noqa: E402
from corpo_jax.data import pipeline  # noqa: E402
from corpo_jax.data.tokenizer import Tokenizer  # noqa: E402
from corpo_jax.model import hf  # noqa: E402
from corpo_jax.train import loop  # noqa: E402
from corpo_jax.train import setup as setup_lib
from tests.data.test_tokenizer import train_llama_style  # noqa: E402

ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b), "trace": f"1. {a} + {b} = {a + b}."}
        for a in range(2, 12) for b in range(3, 11)]
SFT_BATCH = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
forward = jax.jit(model.forward, static_argnums=1)


def _hf_checkpoint(path, vocab_size):
  """A random transformers Mixtral (weights rescaled so logits are O(1)) and its tokenizer."""
  torch.manual_seed(0)
  config = transformers.MixtralConfig(
      vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
      sliding_window=None, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
      eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  hf_model = transformers.MixtralForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else
              torch.randn_like(p) * p.shape[-1] ** -0.5)
  hf_model.save_pretrained(path)
  return hf_model


def _logits(hf_model, tokens_BT):
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(tokens_BT))).logits.numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  texts = [f"{r['prompt']}\n{r['trace']}\n{r['answer']}" for r in ROWS]
  tokenizer_path = train_llama_style(root / "tokenizer.model", texts, vocab_size=290)
  vocab = Tokenizer.load(tokenizer_path).base_vocab_size
  hf_model = _hf_checkpoint(root / "hf", vocab)
  shutil.copy(tokenizer_path, root / "hf" / "tokenizer.model")
  (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  arg = f"init_from={root / 'hf'},data={root / 'task.jsonl'},smoke,workdir={root / 'work'}"
  main = [sys.executable, "-m", "corpo_jax.main", f"--config=configs/pretrained.py:{arg}"]
  out = subprocess.run(main, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert f"(from {root / 'hf'}, vocabulary + <think>, </think>, <pad>)" in out.stderr
  # A rerun skips both finished stages without reading the checkpoint's weights again.
  os.rename(root / "hf" / "model.safetensors", root / "model.safetensors")
  again = subprocess.run(main, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr
  os.rename(root / "model.safetensors", root / "hf" / "model.safetensors")
  rows = [json.loads(line) for line in open(root / "work" / "eval.jsonl")]
  return dict(root=root, config=pretrained.get_config(arg), hf_model=hf_model, vocab=vocab,
              final_rl_eval=[row for row in rows if row["stage"] == "rl"])


@pytest.mark.slow
def test_init_from_hf_trains_and_exports(run, tmp_path):
  root, config, hf_model, V0 = run["root"], run["config"], run["hf_model"], run["vocab"]
  r = setup_lib.setup(config)
  tok, cfg = r.tokenizer, r.cfg
  # The vocabulary grows by exactly the added pieces; existing rows are the checkpoint's.
  assert tok.added_pieces == ("<think>", "</think>", "<pad>") and tok.bos_id == 1
  assert cfg.vocab_size == V0 + 3 and (cfg.think_start_id, cfg.pad_id) == (V0, V0 + 2)
  assert (cfg.d_model, cfg.num_layers, cfg.rope_theta, cfg.thinking_layers) == (64, 1, 1e4, 1)
  assert cfg.moe_dispatch == "expert_parallel" and cfg.capacity_factor * 2 >= 4  # no drops
  params0 = setup_lib.initial_params(r)()
  np.testing.assert_array_equal(params0["embed"][:V0],
                                hf_model.model.embed_tokens.weight.detach().numpy())

  # The first SFT step's nll is that of the checkpoint (the trainer started from it) ...
  loader = pipeline.sft_sequences(pipeline.TaskTraces(r.task("jsonl")), tok,
                                  batch_size=SFT_BATCH, seed=config.seed,
                                  trace_share=config.sft.trace_share, batch_rows=range(SFT_BATCH))
  batch = next(iter(loader))
  logp_BTV = jax.nn.log_softmax(forward(params0, cfg, batch["tokens"], batch["token_mask"]))
  target = (batch["trace_mask"] | batch["answer_mask"])[:, 1:]
  logp_BT = np.take_along_axis(np.asarray(logp_BTV[:, :-1]), batch["tokens"][:, 1:, None], -1)[..., 0]
  first = json.loads(open(root / "work" / "metrics.jsonl").readline())
  assert first["stage"] == "sft" and first["step"] == 1
  np.testing.assert_allclose(first["nll"], -logp_BT[target].mean(), rtol=1e-5)
  # ... whose logits over the pretrained vocabulary equal transformers' (on text without the
  # added pieces, which transformers cannot embed), inside think spans too (the head starts
  # equal to the base head); the new rows' mass lowers log-probs by at most log(1 + 3 / V0).
  prompts, mask = pipeline.left_pad_prompts([tok.prompt_ids(row["prompt"]) for row in ROWS[:4]],
                                            tok.pad_id, buckets=(16,))
  prompts = np.where(mask, prompts, tok.bos_id)  # transformers has no pad to embed
  ours = forward(params0, cfg, jnp.asarray(prompts))
  ref = _logits(hf_model, prompts)
  np.testing.assert_allclose(ours[..., :V0], ref, atol=1e-4, rtol=0)
  restricted = jax.nn.log_softmax(ours[..., :V0])
  np.testing.assert_allclose(restricted, jax.nn.log_softmax(ref), atol=1e-4, rtol=0)
  shift = np.asarray(restricted - jax.nn.log_softmax(ours)[..., :V0])
  assert 0 < shift.min() and shift.max() <= np.log1p(3 / V0) + 1e-6

  # RL ran, and the workdir evaluates (the paired eval rng: the same rows as the run's last
  # evaluation; an untrained random model scores 0, so this checks the path, not the numbers).
  rl_rows = [json.loads(line) for line in open(root / "work" / "metrics.jsonl")
             if '"stage": "rl"' in line]
  assert len(rl_rows) == config.rl.steps and all(np.isfinite(row["loss"]) for row in rl_rows)
  again = loop.evaluate_workdir(str(root / "work"), stage="rl", out=str(tmp_path / "e.jsonl"))
  strip = lambda rows: [json.loads(json.dumps(row)) for row in rows]  # as eval.jsonl holds them
  assert strip(again) == strip(run["final_rl_eval"])

  # Export: transformers loads model and tokenizer; its logits equal our base head's (it has no
  # thinking head) on the SFT batch, think tokens included.
  out = tmp_path / "export"
  assert "with its 1-layer thinking head" in export.export_workdir(str(root / "work"), str(out),
                                                                     stage="rl")
  _, _, _, trained = loop.restore_workdir(str(root / "work"), "rl")
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  base_cfg = dataclasses.replace(cfg, thinking_layers=0)
  base = {k: v for k, v in trained.items() if k != "thinking"}
  tokens = np.where(batch["token_mask"], batch["tokens"], tok.eos_id)
  np.testing.assert_allclose(_logits(exported, tokens), forward(base, base_cfg, tokens),
                             atol=1e-4, rtol=0)
  assert exported.generation_config.pad_token_id == tok.pad_id
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "What is 3 + 4?\n<think>\n1. 3 + 4 = 7.\n</think>\n7"
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
  assert hf_tok.convert_tokens_to_ids(["<think>", "</think>"]) == [V0, V0 + 1]
  assert hf_tok.decode(tok.encode(text)) == text and hf_tok.pad_token_id == tok.pad_id
  # Export -> import is exact for the whole policy, thinking head included, and seeds a run.
  cfg2, params2 = hf.load_mixtral(out)
  assert cfg2.thinking_layers == 1 and cfg2.vocab_size == cfg.vocab_size
  jax.tree.map(np.testing.assert_array_equal, params2, trained)
  config.init_from, config.workdir = str(out), str(tmp_path / "again")
  r2 = setup_lib.setup(config)
  assert r2.tokenizer.added_pieces == () and r2.cfg == cfg
