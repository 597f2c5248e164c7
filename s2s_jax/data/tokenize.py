"""Tokenizers: Moses (sacremoses) for raw text, or `none` for pre-tokenized corpora."""

from __future__ import annotations

import functools
from typing import Callable, Sequence


@functools.lru_cache(maxsize=None)
def _moses(lang: str):
  import sacremoses
  return sacremoses.MosesTokenizer(lang=lang), sacremoses.MosesDetokenizer(lang=lang)


def tokenizer(kind: str, lang: str) -> Callable[[str], list[str]]:
  """A function from a raw sentence to its tokens."""
  if kind == "none":
    return lambda s: s.split()
  if kind == "moses":
    tok, _ = _moses(lang)
    return lambda s: tok.tokenize(s, escape=False, aggressive_dash_splits=False)
  raise ValueError(f"data.tokenizer must be moses or none, got {kind!r}")


def detokenizer(kind: str, lang: str) -> Callable[[Sequence[str]], str]:
  """The inverse of `tokenizer` (as close as the tokenizer allows)."""
  if kind == "none":
    return lambda toks: " ".join(toks)
  if kind == "moses":
    _, detok = _moses(lang)
    return lambda toks: detok.detokenize(list(toks))
  raise ValueError(f"data.tokenizer must be moses or none, got {kind!r}")
