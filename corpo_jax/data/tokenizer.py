"""SentencePiece tokenizers: the bundled one, or any pretrained one with its own special ids.

Any SentencePiece model works, e.g. Mixtral's (32000 pieces; unk 0, bos 1, eos 2, no pad). Its ids
are kept. The pieces the trainer needs and the model lacks, `<think>`, `</think>` and a pad, are
appended at the end of the vocabulary (ids vocab, vocab + 1, ...), so no existing id changes
(`added_pieces`; the model's embedding grows by those rows, corpo_jax/model/pretrained.py). The
think tags are user-defined pieces: SentencePiece matches them in text before segmenting, so each
is always one token. The pad is a control piece, never produced from text. A think tag that exists
as an ordinary piece is re-typed as user-defined in place (same id). bos and eos must exist.

Encoding never adds <bos>/<eos>; callers add them. Text is encoded in one pass: with a Llama-style
model (add_dummy_prefix) encoding pieces separately would put a "▁" before each piece, so the
pipeline encodes a whole row once and finds its parts by byte offsets (`encode_with_offsets`).

User text (prompts, traces, answers) passes through `guard`: a literal `<think>` or `</think>`
in it would become a think token, so `literal_think_tags="reject"` refuses such text and
"escape" writes the tag's "<" as "&lt;" (text_lib.escape_think_tags). `prompt_format` (the
formats of text_lib.format_prompt) is applied by `prompt_ids`.

The bundled model (corpo_jax/data/assets/bundled.model): <pad>=0, <unk>=1, <bos>=2, <eos>=3,
<think>=4, </think>=5 and "\\n" as a single piece (id 6), so that a line break is always its own
token and step markers start a fresh token. Digits are split into single tokens. Normalisation
is the identity and whitespace is kept, so decode(encode(s)) == s. It has 833 pieces (BPE, byte
fallback, full printable-ASCII coverage), below the demo model's vocab_size 1024.
"""

from __future__ import annotations

import hashlib
import io
import os
from importlib import resources
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from corpo_jax.data import text as text_lib
from corpo_jax.data.text import THINK_CLOSE, THINK_OPEN

BUNDLED_VOCAB_SIZE = 1024  # an upper bound: training keeps fewer pieces if the corpus has fewer
LITERAL_THINK_TAGS = ("reject", "escape")
PAD_PIECES = ("<pad>", "<|pad|>", "<corpo_pad>")  # the first that is not a piece already

# Every trainer option that affects the model; num_threads=1 and no input shuffling make the
# result a pure function of the corpus (two trainings give byte-identical files).
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    pad_id=0, unk_id=1, bos_id=2, eos_id=3,
    pad_piece="<pad>", unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>",
    user_defined_symbols=[THINK_OPEN, THINK_CLOSE, "\n"],  # ids 4, 5, 6
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

_Piece = sp_pb2.ModelProto.SentencePiece


def with_special_pieces(model_proto: bytes) -> tuple[bytes, tuple[str, ...]]:
  """(the model with <think>, </think> and a pad, the pieces appended), as the module doc says."""
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  index = {p.piece: i for i, p in enumerate(proto.pieces)}
  added = []
  for tag in (THINK_OPEN, THINK_CLOSE):
    if tag in index:
      proto.pieces[index[tag]].type = _Piece.USER_DEFINED
    else:
      proto.pieces.add(piece=tag, score=0.0, type=_Piece.USER_DEFINED)
      added.append(tag)
  spec = proto.trainer_spec
  if spec.pad_id < 0:
    piece = next(p for p in PAD_PIECES if p not in index)
    proto.pieces.add(piece=piece, score=0.0, type=_Piece.CONTROL)
    spec.pad_id, spec.pad_piece = len(proto.pieces) - 1, piece
    added.append(piece)
  if not added and proto.SerializeToString() == model_proto:
    return model_proto, ()
  return proto.SerializeToString(), tuple(added)


class Tokenizer:
  """A loaded SentencePiece model with the special pieces corpo_jax needs (module doc).

  prompt_format: how a task's question becomes the prompt text (text_lib.format_prompt).
  literal_think_tags: "reject" or "escape" think tags found in user text (`guard`).
  """

  def __init__(self, model_proto: bytes, name: str = "<bytes>", *, prompt_format: str = "plain",
               literal_think_tags: str = "reject"):
    if literal_think_tags not in LITERAL_THINK_TAGS:
      raise ValueError(f"literal_think_tags={literal_think_tags!r} is not one of "
                       f"{LITERAL_THINK_TAGS}.")
    text_lib.format_prompt("", prompt_format)  # validates the format
    self._original, self.name = model_proto, name
    self.prompt_format, self.literal_think_tags = prompt_format, literal_think_tags
    self._proto, self.added_pieces = with_special_pieces(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    for attr in ("bos_id", "eos_id"):
      if getattr(self._sp, attr)() < 0:
        raise ValueError(f"Tokenizer {name} has no {attr[:-3]} piece; corpo_jax needs one (prompts "
                         f"start with <bos>, completions end with <eos>). Use a model trained with "
                         f"{attr}>=0.")
    self.newline_id = self._sp.piece_to_id("\n")

  def __repr__(self) -> str:  # part of the data sources' repr, which grain checks on restore
    options = "".join(f", {k}={v!r}" for k, v, default in (
        ("prompt_format", self.prompt_format, "plain"),
        ("literal_think_tags", self.literal_think_tags, "reject")) if v != default)
    return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}{options})"

  def __reduce__(self):  # picklable for grain worker processes
    return _rebuild, (self._original, self.name, self.prompt_format, self.literal_think_tags)

  @classmethod
  def load(cls, path: str | os.PathLike, **options) -> "Tokenizer":
    if not os.path.isfile(path):
      raise ValueError(f"Tokenizer model {str(path)!r} does not exist; pass the path of a "
                       "SentencePiece .model file or use the bundled one (tokenizer.bundled()).")
    with open(path, "rb") as f:
      return cls(f.read(), name=str(path), **options)

  @property
  def model_proto(self) -> bytes:
    """The serialized model with the added pieces (what an exported tokenizer.model holds)."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def base_vocab_size(self) -> int:
    """Pieces of the model as loaded, before the added ones."""
    return self.vocab_size - len(self.added_pieces)

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

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, each token's [begin, end) byte span in text.encode()); one pass, like `encode`."""
    pieces = self._sp.encode(text, out_type="proto").pieces
    return [p.id for p in pieces], [(p.begin, p.end) for p in pieces]

  def guard(self, text: str, where: str) -> str:
    """User text with its literal think tags refused or escaped (`literal_think_tags`);
    `where` names the text's source in the error."""
    if not text_lib.count_think_tags(text):
      return text
    if self.literal_think_tags == "reject":
      raise ValueError(f"{where} contains a literal {THINK_OPEN} or {THINK_CLOSE}, which would "
                       f"become a think token; remove it, or set --config.literal_think_tags="
                       f"escape to write it as text (&lt;think>).")
    return text_lib.escape_think_tags(text)

  def prompt_ids(self, question: str, where: str = "a prompt") -> list[int]:
    """<bos> and the formatted, guarded question: the tokens a completion continues."""
    prompt = text_lib.format_prompt(self.guard(question, where), self.prompt_format)
    return [self.bos_id] + self.encode(prompt)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; <pad>/<bos>/<eos> are dropped, <think>/</think> appear as text.

    Ids >= vocab_size (a model's vocabulary may be padded beyond the tokenizer's) are dropped.
    """
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _rebuild(proto: bytes, name: str, prompt_format: str, literal_think_tags: str) -> Tokenizer:
  return Tokenizer(proto, name, prompt_format=prompt_format, literal_think_tags=literal_think_tags)


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


def bundled(**options) -> Tokenizer:
  """The tokenizer shipped for the bundled tasks (corpo_jax/data/assets/bundled.model), with
  Tokenizer's keyword options.

  It is train_tokenizer(tasks.bundled_corpus(), BUNDLED_VOCAB_SIZE, ...); tests check that
  retraining reproduces the shipped file byte for byte.
  """
  data = resources.files("corpo_jax.data").joinpath("assets/bundled.model").read_bytes()
  return Tokenizer(data, name="bundled", **options)
