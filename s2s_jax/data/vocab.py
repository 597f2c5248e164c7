"""Word vocabularies: the K most frequent tokens plus four specials, stored as text.

Ids 0..3 are <pad>, <unk>, <s>, </s>; then the kept tokens by decreasing training frequency,
ties broken by the token's string (code point) order, so a corpus always gives the same ids.
The file format is one token a line, in id order (line i + 1 holds id i), UTF-8.
"""

from __future__ import annotations

import collections
import os
from typing import Iterable, Sequence

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Vocab:
  """Token <-> id map. Ids 0..3 are <pad>, <unk>, <s>, </s>; the rest by frequency.

  A token of the text that spells a special (say a literal `</s>` in a pre-tokenized corpus)
  is an unknown word: text can never inject padding, <s> or </s> ids.
  """

  def __init__(self, tokens: Sequence[str]):
    if tuple(tokens[:4]) != SPECIALS:
      raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(tokens[:4])}")
    self.tokens = list(tokens)
    self.index = {t: i for i, t in enumerate(self.tokens)}
    if len(self.index) != len(self.tokens):
      dup = [t for t, n in collections.Counter(self.tokens).items() if n > 1][:5]
      raise ValueError(f"duplicate tokens in vocabulary: {dup}")
    self._words = {t: i for t, i in self.index.items() if i not in (PAD_ID, BOS_ID, EOS_ID)}

  def __len__(self) -> int:
    return len(self.tokens)

  @classmethod
  def build(cls, sentences: Iterable[Sequence[str]], max_size: int) -> "Vocab":
    """Keeps the `max_size` most frequent tokens; ties broken by the token's string order."""
    counts = collections.Counter()
    for sent in sentences:
      counts.update(sent)
    for s in SPECIALS:
      counts.pop(s, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(max_size, 0)]
    return cls(list(SPECIALS) + [t for t, _ in ranked])

  def encode(self, tokens: Sequence[str]) -> list[int]:
    """Ids of `tokens`; unknown tokens (and spelled-out specials) become <unk>."""
    get = self._words.get
    return [get(t, UNK_ID) for t in tokens]

  def id_of(self, token: str) -> int:
    """The id `encode` gives `token`."""
    return self._words.get(token, UNK_ID)

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
    """Share of the tokens of `sentences` that `encode` maps to <unk> (0 for no tokens)."""
    total = unk = 0
    for sent in sentences:
      total += len(sent)
      unk += sum(1 for t in sent if t not in self._words or t == UNK)
    return unk / max(total, 1)

  def save(self, path: str) -> None:
    """Writes one token a line (atomically: a temporary file, then a rename)."""
    bad = [t for t in self.tokens if not t or "\n" in t or "\r" in t]
    if bad:
      raise ValueError(f"{path}: tokens that a line-per-token file cannot hold: {bad[:5]!r}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      f.write("".join(t + "\n" for t in self.tokens))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocab":
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: vocabulary file not found (it is written to the WORKDIR "
                              "when training starts)")
    with open(path, encoding="utf-8", newline="") as f:
      lines = f.read().split("\n")
    if lines and lines[-1] == "":
      lines.pop()
    try:
      return cls(lines)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
