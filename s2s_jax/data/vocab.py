"""Word vocabularies: the K most frequent tokens plus four specials, stored as text."""

from __future__ import annotations

import collections
import os
from typing import Iterable, Sequence

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Vocab:
  """Token <-> id map. Ids 0..3 are <pad>, <unk>, <s>, </s>; the rest by frequency."""

  def __init__(self, tokens: Sequence[str]):
    if tuple(tokens[:4]) != SPECIALS:
      raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(tokens[:4])}")
    self.tokens = list(tokens)
    self.index = {t: i for i, t in enumerate(self.tokens)}
    if len(self.index) != len(self.tokens):
      dup = [t for t, n in collections.Counter(self.tokens).items() if n > 1][:5]
      raise ValueError(f"duplicate tokens in vocabulary: {dup}")

  def __len__(self) -> int:
    return len(self.tokens)

  @classmethod
  def build(cls, sentences: Iterable[Sequence[str]], max_size: int) -> "Vocab":
    """Keeps the `max_size` most frequent tokens; ties broken by the token's string order."""
    counts = collections.Counter(tok for sent in sentences for tok in sent)
    for s in SPECIALS:
      counts.pop(s, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_size]
    return cls(list(SPECIALS) + [t for t, _ in ranked])

  def encode(self, tokens: Sequence[str]) -> list[int]:
    return [self.index.get(t, UNK_ID) for t in tokens]

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Tokens up to (not including) the first </s>; padding and <s> are dropped."""
    out = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      out.append(self.tokens[i])
    return out

  def oov_rate(self, sentences: Iterable[Sequence[str]]) -> float:
    total = unk = 0
    for sent in sentences:
      total += len(sent)
      unk += sum(1 for t in sent if t not in self.index)
    return unk / max(total, 1)

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for t in self.tokens:
        f.write(t + "\n")
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocab":
    if not os.path.exists(path):
      raise FileNotFoundError(f"vocabulary file {path} does not exist")
    with open(path, encoding="utf-8") as f:
      return cls([line.rstrip("\n") for line in f])
