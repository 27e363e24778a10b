"""SentencePiece tokenizer with the project's special tokens, and deterministic training.

Special pieces and ids (corpo_jax.model.config): <pad>=0, <unk>=1, <bos>=2, <eos>=3, <think>=4,
</think>=5; the bundled model also has "\\n" as a single piece (id 6) so that a line break is
always its own token and step markers start a fresh token. Digits are split into single tokens.
Normalisation is the identity and whitespace is kept, so decode(encode(s)) == s. The bundled
model (BPE, byte fallback, full printable-ASCII coverage) has 833 pieces, below the demo model's
vocab_size 1024; the trainer sets the model's vocab_size from `Tokenizer.vocab_size`.
"""

from __future__ import annotations

import hashlib
import io
import os
from importlib import resources
from typing import Iterable, Sequence

import sentencepiece as spm

from corpo_jax.model.config import BOS_ID, EOS_ID, PAD_ID, THINK_END_ID, THINK_START_ID, UNK_ID
from corpo_jax.data.text import THINK_CLOSE, THINK_OPEN

BUNDLED_VOCAB_SIZE = 1024  # an upper bound: training keeps fewer pieces if the corpus has fewer

# Every trainer option that affects the model; num_threads=1 and no input shuffling make the
# result a pure function of the corpus (two trainings give byte-identical files).
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    pad_piece="<pad>", unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>",
    user_defined_symbols=[THINK_OPEN, THINK_CLOSE, "\n"],
    split_digits=True,
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    hard_vocab_limit=False,
    num_threads=1,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 16,
    minloglevel=2,
)
assert [THINK_START_ID, THINK_END_ID] == [4, 5], "user_defined_symbols above follow ids 0..3"


class Tokenizer:
  """A loaded SentencePiece model. `encode` never adds <bos>/<eos>; callers add them."""

  def __init__(self, model_proto: bytes, name: str = "<bytes>"):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._proto, self.name = model_proto, name
    for piece in (THINK_OPEN, THINK_CLOSE):
      if self._sp.piece_to_id(piece) == self._sp.unk_id():
        raise ValueError(f"Tokenizer {name} has no {piece!r} piece; retrain it with "
                         f"user_defined_symbols=['{THINK_OPEN}', '{THINK_CLOSE}'] "
                         "(see corpo_jax.data.tokenizer.train_tokenizer).")
    for attr in ("pad_id", "bos_id", "eos_id"):
      if getattr(self._sp, attr)() < 0:
        raise ValueError(f"Tokenizer {name} has no {attr[:-3]} piece; retrain it with "
                         f"{attr}>=0 (see corpo_jax.data.tokenizer.train_tokenizer).")
    self.newline_id = self._sp.piece_to_id("\n")

  def __repr__(self) -> str:
    return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

  def __reduce__(self):  # picklable for grain worker processes
    return Tokenizer, (self._proto, self.name)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    if not os.path.isfile(path):
      raise ValueError(f"Tokenizer model {str(path)!r} does not exist; pass the path of a "
                       "SentencePiece .model file or use the bundled one (tokenizer.bundled()).")
    with open(path, "rb") as f:
      return cls(f.read(), name=str(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def think_start_id(self) -> int:
    return self._sp.piece_to_id(THINK_OPEN)

  @property
  def think_end_id(self) -> int:
    return self._sp.piece_to_id(THINK_CLOSE)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; <pad>/<bos>/<eos> are dropped, <think>/</think> appear as text.

    Ids >= vocab_size (a model's vocabulary may be padded beyond the tokenizer's) are dropped.
    """
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def corpus_digest(texts: Sequence[str], vocab_size: int) -> str:
  h = hashlib.sha256(f"{spm.__version__}|{vocab_size}|{sorted(_TRAINER_OPTIONS.items())}".encode())
  for text in texts:
    h.update(text.encode())
    h.update(b"\0")
  return h.hexdigest()


def train_tokenizer(texts: Sequence[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
  """Trains a SentencePiece model on `texts` and writes it to `path` (cached).

  Deterministic: the same texts and vocab_size give a byte-identical model file. If `path`
  exists and its sidecar `path.sha256` records the same corpus digest, it is loaded instead of
  retrained. The trained vocabulary may be smaller than `vocab_size` for a narrow corpus.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("train_tokenizer needs a non-empty list of texts.")
  digest = corpus_digest(texts, vocab_size)
  stamp = f"{path}.sha256"
  if os.path.isfile(path) and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read().strip() == digest:
        return Tokenizer.load(path)
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out,
                                 vocab_size=vocab_size, **_TRAINER_OPTIONS)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(out.getvalue())
  with open(stamp, "w") as f:
    f.write(digest + "\n")
  return Tokenizer(out.getvalue(), name=str(path))


def bundled() -> Tokenizer:
  """The tokenizer shipped for the bundled tasks (corpo_jax/data/assets/bundled.model).

  It is train_tokenizer(tasks.bundled_corpus(), BUNDLED_VOCAB_SIZE, ...); tests check that
  retraining reproduces the shipped file byte for byte.
  """
  data = resources.files("corpo_jax.data").joinpath("assets/bundled.model").read_bytes()
  return Tokenizer(data, name="bundled")
