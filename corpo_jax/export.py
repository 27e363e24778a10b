"""A run's policy as a Hugging Face directory, and back.

  python -m corpo_jax.export --workdir W [--stage S] --out DIR

writes the newest checkpoint of stage S (default: the last stage that has one) as:
  model.safetensors (or shards + index), config.json   Mixtral, readable by transformers
  corpo_jax_thinking.{json,safetensors}                 the thinking head, if the model has one
                                                        (corpo_jax/model/hf.py; transformers
                                                        ignores it, `load_mixtral` reads it)
  generation_config.json                                bos / eos / pad ids
  tokenizer.model                                       the run's SentencePiece model, with the
                                                        pieces the run added (<think>, ...)
  tokenizer_config.json, special_tokens_map.json        for transformers.AutoTokenizer
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load it; `--config.init_from=DIR` starts a new run from it, thinking head included.

HF Mixtral has no thinking head, so transformers computes the base head's logits everywhere,
also inside think spans; corpo_jax's forward of the same directory uses the head there.
"""

from __future__ import annotations

import json
import os
import pathlib

from corpo_jax.data.tokenizer import Tokenizer
from corpo_jax.model import hf
from corpo_jax.model.config import ModelConfig


def tokenizer_files(tok: Tokenizer, cfg: ModelConfig) -> dict[str, str | bytes]:
  """File name -> contents of the tokenizer files transformers reads (LlamaTokenizer: the
  SentencePiece model itself, converted by transformers on load)."""
  piece = tok.id_to_piece
  special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
             "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id)}
  config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True,
            "add_eos_token": False, "legacy": False, "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False}
  dump = lambda d: json.dumps(d, indent=2) + "\n"
  return {"tokenizer.model": tok.model_proto, "tokenizer_config.json": dump(config),
          "special_tokens_map.json": dump(special)}


def special_ids(tok: Tokenizer) -> dict[str, int]:
  return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def export(params, cfg: ModelConfig, tok: Tokenizer, out: str | os.PathLike) -> pathlib.Path:
  """Writes `params` of `cfg` with tokenizer `tok` as the directory of the module docstring."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"--out={str(out)!r} is not empty; export into a new directory.")
  hf.save_mixtral(params, cfg, out, extra_config=special_ids(tok))
  generation = {**special_ids(tok), "_from_model_config": False}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  for name, data in tokenizer_files(tok, cfg).items():
    (out / name).write_bytes(data if isinstance(data, bytes) else data.encode())
  return out


def export_workdir(workdir: str, out: str, stage: str | None = None) -> str:
  """Exports a run's checkpoint (train/loop.py restore_workdir); returns a line for the user."""
  from corpo_jax.train import loop  # pylint: disable=g-import-not-at-top  # heavy; CLI only
  run, name, step, params = loop.restore_workdir(workdir, stage)
  export(params, run.cfg, run.tokenizer, out)
  head = f" with its {run.cfg.thinking_layers}-layer thinking head" if (
      run.cfg.has_thinking_head) else ""
  return f"exported stage {name} step {step}{head} to {os.path.abspath(out)}"


def main(argv) -> None:
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f["verbosity"].present:  # orbax logs every restore step at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  print(f"corpo_jax: {export_workdir(f.workdir, f.out, f.stage)}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top

  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The --config.workdir of a run.", required=True)
  flags.DEFINE_string("out", None, "A new directory to write.", required=True)
  flags.DEFINE_string("stage", None, "Export this stage's newest checkpoint (default: the newest "
                      "checkpoint of the last stage that has one).")

  def _main(argv):
    try:
      main(argv)
    except ValueError as e:  # a user's mistake: say what to change, without a traceback
      print(f"corpo_jax: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main)
