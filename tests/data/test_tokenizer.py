"""Tokenizer: special ids, round trips, deterministic cached training, the shipped model."""

import os
import pickle

import numpy as np

import pytest
import sentencepiece as spm

from corpo_jax.data import pipeline, tasks, tokenizer
from corpo_jax.model import config

CORPUS = [f"Compute {a} + {b}.\n<think>\n1. Ones: {a} + {b} = {a + b}.\n</think>\n{a + b}"
          for a in range(40) for b in range(0, 40, 7)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tokenizer with Mixtral's layout: unk 0, bos 1, eos 2, no pad, dummy prefix, bytes."""
  return tokenizer.Tokenizer.load(train_llama_style(tmp_path_factory.mktemp("llama") / "t.model"))


def train_llama_style(path, texts=CORPUS, vocab_size=300):
  with open(path, "wb") as f:
    _train_llama_style(f, texts, vocab_size)
  return path


def _train_llama_style(writer, texts, vocab_size):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=writer, vocab_size=vocab_size,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, minloglevel=2, num_threads=1)


@pytest.fixture(scope="module")
def tok():
  return tokenizer.bundled()


def test_bundled_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.think_start_id,
          tok.think_end_id) == (0, 1, 2, 3, 4, 5)
  tiny = config.ModelConfig.preset("tiny")  # the presets' defaults are the bundled ids
  assert (tiny.pad_id, tiny.think_start_id, tiny.think_end_id) == (0, 4, 5)
  assert tok.added_pieces == () and tok.model_proto == tok._original
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
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "x"),
                                 vocab_size=100, minloglevel=2, num_threads=1, eos_id=-1)
  with pytest.raises(ValueError, match="no eos piece"):
    tokenizer.Tokenizer.load(tmp_path / "x.model")
  with pytest.raises(ValueError, match="literal_think_tags='drop'"):
    tokenizer.bundled().__class__(b"", literal_think_tags="drop")


# ----------------------------------------------------------------------------- pretrained


def test_llama_style_pieces_are_added_at_the_end(llama):
  """Mixtral's layout (unk 0, bos 1, eos 2, no pad): <think>, </think>, <pad> get new ids after
  the last piece and every existing id, piece and encoding stays as it was."""
  original = spm.SentencePieceProcessor(model_proto=llama._original)
  n = original.vocab_size()
  assert llama.added_pieces == ("<think>", "</think>", "<pad>")
  assert (llama.base_vocab_size, llama.vocab_size) == (n, n + 3)
  assert (llama.unk_id, llama.bos_id, llama.eos_id) == (0, 1, 2)
  assert (llama.think_start_id, llama.think_end_id, llama.pad_id) == (n, n + 1, n + 2)
  assert [llama.id_to_piece(i) for i in range(n)] == [original.id_to_piece(i) for i in range(n)]
  for text in CORPUS[::37]:
    plain = text.replace("<think>", "").replace("</think>", "")
    assert llama.encode(plain) == original.encode(plain)
  assert llama.encode("a <pad> b") == original.encode("a <pad> b")  # control: never from text
  assert llama.decode([llama.bos_id, *llama.encode("x <think>\ny</think>"), llama.pad_id]) == (
      "x <think>\ny</think>")


def test_existing_ordinary_think_piece_keeps_its_id(tmp_path):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "m"),
                                 vocab_size=100, minloglevel=2, num_threads=1,
                                 control_symbols=["<think>"], pad_id=3, unk_id=0, bos_id=1, eos_id=2)
  tok = tokenizer.Tokenizer.load(tmp_path / "m.model")
  assert tok.added_pieces == ("</think>",) and tok.think_start_id == 4 and tok.pad_id == 3
  assert tok.think_start_id in tok.encode("1<think>2")  # re-typed: now matched in text


@pytest.mark.parametrize("name", ["bundled", "llama"])
def test_sft_rows_are_one_pass_encodings(name, llama):
  """An SFT row's ids equal encoding its whole text once (for a dummy-prefix tokenizer, encoding
  the parts separately gives other ids: a stray '▁' before each part), and its prompt equals
  the prompt RL samples from."""
  tok = tokenizer.bundled() if name == "bundled" else llama
  prompt, trace, answer = "Compute 12 + 30.", "1. Ones: 2 + 0 = 2.\n2. Tens: 1 + 3 = 4.", "42"
  row = pipeline.sft_example(tok, prompt, trace, answer)
  whole = [tok.bos_id] + tok.encode(f"{prompt}\n<think>\n{trace}\n</think>\n{answer}") + [tok.eos_id]
  assert list(row["tokens"]) == whole
  assert list(row["tokens"][:len(tok.prompt_ids(prompt))]) == tok.prompt_ids(prompt)
  piecewise = (tok.prompt_ids(prompt) + [tok.think_start_id] + tok.encode("\n" + trace + "\n")
               + [tok.think_end_id] + tok.encode("\n" + answer) + [tok.eos_id])
  assert (piecewise == whole) == (name == "bundled")
  assert tok.decode(row["tokens"][row["trace_mask"]]) == f"\n{trace}\n</think>"
  labelled = np.flatnonzero(row["step_labels"])
  assert [tok.decode(row["tokens"][i:i + 1]).strip() for i in labelled] == ["1", "2"]


def test_prompt_formats_and_literal_think_tags(llama):
  tok = tokenizer.Tokenizer(llama._original, prompt_format="mistral_instruct")
  assert tok.prompt_ids("2+2?") == [tok.bos_id] + tok.encode("[INST] 2+2? [/INST]")
  with pytest.raises(ValueError, match="row 7 contains a literal <think>"):
    tok.prompt_ids("say <think>", "row 7")
  esc = tokenizer.Tokenizer(llama._original, literal_think_tags="escape")
  assert tok.think_start_id not in esc.prompt_ids("say <think> </think>")
  assert esc.decode(esc.prompt_ids("say <think>")) == "say &lt;think>\n"
  row = pipeline.sft_example(esc, "a <think>", "b </think>", "<think>c")
  assert int(row["think_tags"]) == 3
  assert list(row["tokens"]).count(esc.think_start_id) == 1
  assert "literal_think_tags='escape'" in repr(esc) and repr(tokenizer.bundled()) == (
      "Tokenizer('bundled', vocab_size=833)")  # grain compares the sources' repr on restore
  again = pickle.loads(pickle.dumps(tok))
  assert again.prompt_format == "mistral_instruct" and again.vocab_size == tok.vocab_size


def test_train_rejects_empty_corpus(tmp_path):
  with pytest.raises(ValueError, match="non-empty"):
    tokenizer.train_tokenizer([], 100, tmp_path / "x.model")
