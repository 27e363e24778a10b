"""Tokenizer: special ids, round trips, deterministic cached training, the shipped model."""

import os

import pytest
import sentencepiece as spm

from corpo_jax.data import tasks, tokenizer
from corpo_jax.model import config

CORPUS = [f"Compute {a} + {b}.\n<think>\n1. Ones: {a} + {b} = {a + b}.\n</think>\n{a + b}"
          for a in range(40) for b in range(0, 40, 7)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.bundled()


def test_bundled_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.think_start_id, tok.think_end_id) == (
      config.PAD_ID, config.UNK_ID, config.BOS_ID, config.EOS_ID, config.THINK_START_ID,
      config.THINK_END_ID) == (0, 1, 2, 3, 4, 5)
  assert tok.vocab_size == 833 <= 1024  # golden: changes only with the bundled corpus/options
  assert tok.newline_id == 6


@pytest.mark.parametrize("text,ids", [
    ("<think>", [4]), ("</think>", [5]), ("<think>\n</think>", [4, 6, 5]), ("\n\n", [6, 6]),
])
def test_special_pieces_are_single_ids(tok, text, ids):
  assert tok.encode(text) == ids
  assert tok.decode(ids) == text


def test_decode_drops_control_tokens_and_keeps_think(tok):
  ids = [tok.bos_id] + tok.encode("Compute 1 + 2.\n<think>\nx\n</think>\n3") + [tok.eos_id, 0, 0]
  assert tok.decode(ids) == "Compute 1 + 2.\n<think>\nx\n</think>\n3"


def test_round_trip_and_single_digits(tok):
  texts = ["Compute 90817 - 2345.\n", "  two  spaces\tand tabs ", "héllo ✓ naïve #### 42"]
  assert tok.decode_batch(tok.encode_batch(texts)) == texts
  pieces = [tok.id_to_piece(i) for i in tok.encode("1234567890")]
  assert pieces == list("1234567890")


def test_same_corpus_same_model_bytes(tmp_path):
  a = tokenizer.train_tokenizer(CORPUS, 300, tmp_path / "a.model")
  b = tokenizer.train_tokenizer(CORPUS, 300, tmp_path / "b.model")
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert a.encode(CORPUS[5]) == b.encode(CORPUS[5])
  assert a.think_start_id == 4 and a.think_end_id == 5


def test_training_is_cached_by_corpus_digest(tmp_path):
  path = tmp_path / "t.model"
  tokenizer.train_tokenizer(CORPUS, 300, path)
  os.utime(path, (0, 0))
  tokenizer.train_tokenizer(CORPUS, 300, path)
  assert os.path.getmtime(path) == 0  # reused, not retrained
  tokenizer.train_tokenizer(CORPUS[:-1], 300, path)
  assert os.path.getmtime(path) > 0  # another corpus retrains


def test_shipped_model_is_reproducible(tmp_path):
  """If this fails after changing the tasks' text or the trainer options, retrain the asset:
  train_tokenizer(tasks.bundled_corpus(), BUNDLED_VOCAB_SIZE, path), copy to data/assets."""
  tokenizer.train_tokenizer(tasks.bundled_corpus(), tokenizer.BUNDLED_VOCAB_SIZE,
                            tmp_path / "bundled.model")
  shipped = os.path.join(os.path.dirname(tokenizer.__file__), "assets", "bundled.model")
  assert (tmp_path / "bundled.model").read_bytes() == open(shipped, "rb").read()


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tokenizer.Tokenizer.load(tmp_path / "missing.model")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=100, minloglevel=2, num_threads=1)
  with pytest.raises(ValueError, match="no '<think>' piece"):
    tokenizer.Tokenizer.load(tmp_path / "plain.model")


def test_train_rejects_empty_corpus(tmp_path):
  with pytest.raises(ValueError, match="non-empty"):
    tokenizer.train_tokenizer([], 100, tmp_path / "x.model")
