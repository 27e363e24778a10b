"""TRL's GRPO loss on the batch of tests/rl/test_step.py: the source of the literal values in
`TRL_LOSSES` there (issue 26: the TRL-equivalent settings match TRL's numbers).

TRL is not a dependency of corpo_jax. Install it next to the project's environment, without
its dependencies (torch and transformers come from the venv, unchanged), then run:

  .venv/bin/pip install --no-deps --target /tmp/trlpkgs trl==1.16.0 accelerate==1.16.0 \\
      datasets==5.2.0 pandas==3.1.1 pyarrow==24.0.0 multiprocess==0.70.19 dill==0.3.8 \\
      xxhash==4.1.0
  PYTHONPATH=/tmp/trlpkgs:. .venv/bin/python docs/trl_check.py

What runs is TRL's own code: a real `GRPOTrainer` (GRPOConfig with each parametrisation's
settings; a throwaway 1-layer Llama saved to a temporary folder and a word-level tokenizer,
both made here, nothing downloaded), whose
`_generate_and_score_completions` (the rollout_func path: padding, mask_truncated_completions,
the reward function call, the grouped advantages with scale_rewards, the reference log-probs)
and `_compute_loss` (ratios, clipping, the bias-corrected k3 KL, the loss_type's aggregation)
produce the number. Two things come from corpo_jax instead of a torch forward pass:

  * the rollout: `rollout_func` hands TRL the test batch's own prompt and completion token ids
    (`_batch()`), with pad id 0 TRL's padded input_ids equal the test's tokens (asserted), and
    the eos ids are chosen so that TRL's truncation test (last id not eos) marks exactly the
    test's `truncated` rows (asserted);
  * the per-token log-probs: `_get_per_token_logps_and_entropies` is replaced by the
    corpo_jax log-probs of the test (`token_logprobs(..., chunk=3)` of the params and of
    the reference params * 0.9), in float64, for the policy or the reference model as asked.

One update per rollout (num_iterations 1, gradient_accumulation_steps 1): old log-probs are
the policy's, so the ratio is 1, as in the test. Prints one line per parametrisation, the
loss in full float precision (repr), ready to paste into tests/rl/test_step.py.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()  # as conftest
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's warning
os.environ.setdefault("WANDB_DISABLED", "true")

import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from corpo_jax import model  # noqa: E402
from corpo_jax.train.logprobs import token_logprobs  # noqa: E402
from tests.rl import test_step as t  # noqa: E402  the test's CFG, _batch, B, G, P, TC

# (loss_type, scale_rewards, mask_truncated_completions): the cases of TRL_LOSSES in the test.
CASES = [("grpo", "group", False), ("bnpo", "batch", True), ("dr_grpo", "none", True)]
BETA = 0.05
PAD, EOS = 0, 1  # the test's tokens are drawn from [6, vocab): ids 0..5 are free


def corpo_logprobs():
  b = t._batch()
  params = model.init_params(t.CFG, jax.random.key(0))  # the test's `params` fixture
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  logp = lambda p: np.asarray(token_logprobs(p, t.CFG, b.tokens, b.token_mask, chunk=3)[0],
                              np.float64)
  return b, logp(params), logp(ref_params)


def tiny_model_and_tokenizer(eos_ids, path):
  """Saved to `path`: TRL loads the policy and the reference model from it."""
  vocab = {f"t{i}": i for i in range(t.CFG.vocab_size)}
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
      pad_token="t0", eos_token="t1", unk_token="t2")
  assert tok.pad_token_id == PAD and tok.eos_token_id == EOS
  cfg = transformers.LlamaConfig(vocab_size=t.CFG.vocab_size, hidden_size=16,
                                 intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 pad_token_id=PAD, eos_token_id=EOS)
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(cfg)  # never run: its log-probs are replaced
  lm.generation_config.eos_token_id = eos_ids
  lm.save_pretrained(path)
  return tok


def trl_loss(b, logp, ref_logp, loss_type, scale_rewards, mask_truncated, out_dir):
  n = t.B * t.G
  prompt_ids = [[int(x) for x, m in zip(b.tokens[i, :t.P], b.token_mask[i, :t.P]) if m]
                for i in range(n)]
  lengths = b.loss_mask.sum(1)
  completion_ids = [[int(x) for x in b.tokens[i, t.P:t.P + lengths[i]]] for i in range(n)]
  # TRL calls a completion truncated when its last id is not an eos or pad id: make the last
  # ids of the untruncated rows the eos ids (generation_config may list several).
  eos_ids = sorted({EOS} | {c[-1] for c, tr in zip(completion_ids, b.truncated) if not tr})
  assert all((c[-1] in eos_ids) != tr for c, tr in zip(completion_ids, b.truncated))
  model_dir = os.path.join(out_dir, "model")
  tok = tiny_model_and_tokenizer(eos_ids, model_dir)

  def rollout_func(prompts, trainer):
    rows = [int(p.removeprefix("row")) for p in prompts]
    return {"prompt_ids": [prompt_ids[i] for i in rows],
            "completion_ids": [completion_ids[i] for i in rows], "logprobs": None}

  def reward(prompts, completions, completion_ids, reward, **kwargs):
    return reward

  rewards = b.rewards.reshape(-1)
  # An explicit fingerprint: datasets' default one pickles the arrow table with dill, which
  # fails on pyarrow's cython functions here (PicklingError: MonthDayNano).
  data = Dataset(pa.table({"prompt": [f"row{i}" for i in range(n)],
                           "reward": [float(r) for r in rewards]}), fingerprint="trl_check")
  args = GRPOConfig(
      output_dir=out_dir, report_to="none", use_cpu=True, bf16=False, fp16=False,
      per_device_train_batch_size=n, num_generations=t.G, gradient_accumulation_steps=1,
      max_completion_length=t.TC, beta=BETA, loss_type=loss_type, scale_rewards=scale_rewards,
      mask_truncated_completions=mask_truncated, epsilon=0.2, temperature=1.0,
      importance_sampling_level="token", use_bias_correction_kl=True, seed=0)
  trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tok, rollout_func=rollout_func)
  assert trainer.ref_model is not None and trainer.eos_token_ids == eos_ids

  completion = lambda x: torch.tensor(x[:, t.P:])  # logp[:, j] is log p(token j | < j)
  policy, ref = completion(logp), completion(ref_logp)

  def logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
    assert logits_to_keep == t.TC
    np.testing.assert_array_equal(input_ids.numpy(), b.tokens)
    which = ref if model is trainer.ref_model else policy
    assert model is trainer.ref_model or model is trainer.model
    return which.clone(), torch.zeros_like(which), None

  trainer._get_per_token_logps_and_entropies = logps
  trainer.model.train()
  inputs = [{"prompt": f"row{i}", "reward": float(r)} for i, r in enumerate(rewards)]
  batch = trainer._generate_and_score_completions(inputs)
  want_mask = b.loss_mask[:, t.P:] & ~(b.truncated[:, None] & mask_truncated)
  np.testing.assert_array_equal(batch["completion_mask"].numpy().astype(bool), want_mask)
  trainer.current_gradient_accumulation_steps = 1  # what Trainer's train loop sets here
  with torch.no_grad():
    return float(trainer._compute_loss(trainer.model, batch))


def main():
  print(f"trl {trl.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}")
  b, logp, ref_logp = corpo_logprobs()
  with tempfile.TemporaryDirectory() as out_dir:
    for loss_type, scale, mask_truncated in CASES:
      loss = trl_loss(b, logp, ref_logp, loss_type, scale, mask_truncated, out_dir)
      print(f"({loss_type!r}, {scale!r}, {mask_truncated}): {loss!r},")


if __name__ == "__main__":
  main()
