"""Tokenizers: Moses (sacremoses) for raw text, `none` for pre-tokenized corpora, or SentencePiece.

- moses: Moses word tokenization (no XML escaping) by `moses.MosesTokenizer`, which gives
  `sacremoses`' tokens several times faster; `sacremoses` detokenizes output.
- none: split on whitespace; output tokens are joined with spaces (the paper's data was
  pre-tokenized, and its BLEU was computed on tokenized text).
- sentencepiece: subword pieces of a model trained on the training split (`train_sentencepiece`,
  called by `pipeline.load_corpus`) and saved in the WORKDIR as `spm.<lang>.model`; decoding
  reloads it from there. A language pair with the same language on both sides shares one model.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Callable, Iterable, Sequence

from s2s_jax.config import TOKENIZERS as KINDS
from s2s_jax.data import moses
from s2s_jax.data.sources import DataError

SPM_INPUT_SENTENCES = 2_000_000  # sentences sampled (seeded) to train a SentencePiece model


@functools.lru_cache(maxsize=None)
def _moses_detokenizer(lang: str):
  import sacremoses
  return sacremoses.MosesDetokenizer(lang=lang)


def spm_model_path(workdir: str, lang: str) -> str:
  return os.path.join(workdir, f"spm.{lang}.model")


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, path: str,
                        seed: int = 0) -> int:
  """Trains a unigram SentencePiece model on raw `sentences`, saves it at `path`.

  The size is at most `vocab_size` pieces (fewer when the text is too small for that many).
  Returns the number of pieces.
  """
  import sentencepiece as spm
  sentences = [s for s in sentences if s]
  if not sentences:
    raise DataError(f"{path}: no training text to learn a SentencePiece model from")
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        input_sentence_size=SPM_INPUT_SENTENCES, shuffle_input_sentence=True, num_threads=1,
        minloglevel=2)
  except RuntimeError as e:
    raise DataError(f"{path}: SentencePiece training failed: {e}") from None
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return _spm_from_file(path).get_piece_size()


def _spm_from_file(path: str):
  if not os.path.exists(path):
    raise DataError(f"{path}: SentencePiece model not found (data.tokenizer=sentencepiece "
                    "trains it on the training split when training starts in this WORKDIR)")
  st = os.stat(path)
  return _load_spm(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load_spm(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # only part of the cache key: a retrained model is reloaded
  import sentencepiece as spm
  with open(path, "rb") as f:
    return spm.SentencePieceProcessor(model_proto=f.read())


def _check(kind: str, workdir: str | None) -> None:
  if kind not in KINDS:
    raise DataError(f"data.tokenizer must be one of {', '.join(KINDS)}, got {kind!r}")
  if kind == "sentencepiece" and not workdir:
    raise DataError("data.tokenizer=sentencepiece needs the WORKDIR that holds its model")


def tokenizer(kind: str, lang: str, workdir: str | None = None) -> Callable[[str], list[str]]:
  """A function from a raw sentence to its tokens (`workdir`: only for sentencepiece)."""
  _check(kind, workdir)
  if kind == "none":
    return str.split
  if kind == "moses":
    return moses.tokenizer(lang).tokenize
  sp = _spm_from_file(spm_model_path(workdir, lang))
  return lambda s: sp.encode(s, out_type=str)


def detokenizer(kind: str, lang: str,
                workdir: str | None = None) -> Callable[[Sequence[str]], str]:
  """The inverse of `tokenizer` (as close as the tokenizer allows)."""
  _check(kind, workdir)
  if kind == "none":
    return " ".join
  if kind == "moses":
    detok = _moses_detokenizer(lang)
    return lambda toks: detok.detokenize(list(toks), unescape=False)
  sp = _spm_from_file(spm_model_path(workdir, lang))
  return lambda toks: sp.decode_pieces(list(toks))
