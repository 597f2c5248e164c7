"""From raw sentence pairs to padded, length-bucketed batches of ids.

Flow: sources.load_pairs (raw text per split) -> tokenize -> filter -> vocabularies (built on
train, saved in the WORKDIR) -> ids (source reversed when asked, </s> appended to the target)
-> `BatchIterator` (training, seeded and resumable) or `eval_batches` (fixed order).

Source reversal: the source token list (without any end symbol; the encoder input has no
</s>) is reversed word by word; the target is never reversed and always ends with </s>.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Iterator, Sequence

import numpy as np

from s2s_jax.config import DataConfig
from s2s_jax.data import sources
from s2s_jax.data.tokenize import tokenizer
from s2s_jax.data.vocab import EOS_ID, PAD_ID, Vocab

SRC_VOCAB_FILE = "vocab.src.txt"
TGT_VOCAB_FILE = "vocab.tgt.txt"

Example = tuple[list[int], list[int]]  # (source ids in encoder order, target ids ending in </s>)


@dataclasses.dataclass
class Corpus:
  """Tokenized, filtered and encoded splits plus the vocabularies."""
  src_vocab: Vocab
  tgt_vocab: Vocab
  examples: dict[str, list[Example]]  # split -> examples
  tokens: dict[str, list[tuple[list[str], list[str]]]]  # split -> kept token pairs (for analyses)


def encode_pair(src_toks: Sequence[str], tgt_toks: Sequence[str], src_vocab: Vocab,
                tgt_vocab: Vocab, reverse_source: bool) -> Example:
  """Ids for one pair: the source reversed if asked, </s> appended to the target."""
  src = src_vocab.encode(src_toks)
  if reverse_source:
    src = src[::-1]
  return src, tgt_vocab.encode(tgt_toks) + [EOS_ID]


def encode_source(src_toks: Sequence[str], src_vocab: Vocab, reverse_source: bool) -> list[int]:
  src = src_vocab.encode(src_toks)
  return src[::-1] if reverse_source else src


def load_vocabs(workdir: str) -> tuple[Vocab, Vocab]:
  return (Vocab.load(os.path.join(workdir, SRC_VOCAB_FILE)),
          Vocab.load(os.path.join(workdir, TGT_VOCAB_FILE)))


def load_corpus(cfg: DataConfig, workdir: str | None) -> Corpus:
  """Loads every split; builds the vocabularies on train (or reloads them from `workdir`)."""
  raw = sources.load_pairs(cfg)
  tok_src, tok_tgt = tokenizer(cfg.tokenizer, cfg.src_lang), tokenizer(cfg.tokenizer, cfg.tgt_lang)
  tokens: dict[str, list[tuple[list[str], list[str]]]] = {}
  for split, pairs in raw.items():
    kept, empty, long = [], 0, 0
    for s, t in pairs:
      st, tt = tok_src(s), tok_tgt(t)
      if not st or not tt:
        empty += 1
      elif split == "train" and (len(st) > cfg.max_len or len(tt) > cfg.max_len):
        long += 1
      else:
        kept.append((st, tt))
    logging.info("data %s: %d pairs, kept %d, dropped %d with an empty side, %d longer than %d",
                 split, len(pairs), len(kept), empty, long, cfg.max_len)
    tokens[split] = kept
  paths = [os.path.join(workdir, f) for f in (SRC_VOCAB_FILE, TGT_VOCAB_FILE)] if workdir else []
  if paths and all(os.path.exists(p) for p in paths):
    src_vocab, tgt_vocab = load_vocabs(workdir)
  else:
    src_vocab = Vocab.build((s for s, _ in tokens["train"]), cfg.src_vocab_size)
    tgt_vocab = Vocab.build((t for _, t in tokens["train"]), cfg.tgt_vocab_size)
    if paths:
      os.makedirs(workdir, exist_ok=True)
      src_vocab.save(paths[0])
      tgt_vocab.save(paths[1])
  for split, pairs in tokens.items():
    logging.info("data %s: OOV rate source %.4f, target %.4f", split,
                 src_vocab.oov_rate(s for s, _ in pairs), tgt_vocab.oov_rate(t for _, t in pairs))
  examples = {split: [encode_pair(s, t, src_vocab, tgt_vocab, cfg.reverse_source) for s, t in pairs]
              for split, pairs in tokens.items()}
  return Corpus(src_vocab, tgt_vocab, examples, tokens)


def padded_length(n: int, bucket_width: int) -> int:
  """The bucket's padded length: `n` rounded up to a multiple of `bucket_width`."""
  return max(bucket_width, int(math.ceil(n / bucket_width)) * bucket_width)


def example_length(ex: Example) -> int:
  """Source and target share one padded length, so the set of shapes stays small."""
  return max(len(ex[0]), len(ex[1]))


def make_batch(examples: Sequence[Example], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """A BxL batch; rows past len(examples) are all padding (they add nothing to the loss)."""
  src = np.full((batch_size, length), PAD_ID, np.int32)
  tgt = np.full((batch_size, length), PAD_ID, np.int32)
  for i, (s, t) in enumerate(examples):
    src[i, :len(s)] = s
    tgt[i, :len(t)] = t
  return {"src": src, "tgt": tgt}


def bucketed_batches(examples: Sequence[Example], batch_size: int, bucket_width: int,
                     rng: np.random.Generator | None) -> list[tuple[int, list[int]]]:
  """Groups example indices into (padded length, indices) batches of similar length.

  With `rng`, the examples are shuffled inside each bucket and the batch order is shuffled;
  without it, the order is deterministic (by length). Every example appears exactly once.
  """
  buckets: dict[int, list[int]] = {}
  for i, ex in enumerate(examples):
    buckets.setdefault(padded_length(example_length(ex), bucket_width), []).append(i)
  batches = []
  for length in sorted(buckets):
    idx = np.array(buckets[length])
    if rng is not None:
      idx = idx[rng.permutation(len(idx))]
    for start in range(0, len(idx), batch_size):
      batches.append((length, idx[start:start + batch_size].tolist()))
  if rng is not None:
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
  return batches


class BatchIterator:
  """Endless training batches, epoch after epoch, reproducible from (seed, epoch, index).

  `state()` is a small dict saved with checkpoints; `restore(state)` makes the iterator yield
  exactly the batches an uninterrupted run would have yielded next.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, bucket_width: int, seed: int):
    if not examples:
      raise ValueError("no training examples left after filtering")
    self.examples = list(examples)
    self.batch_size, self.bucket_width, self.seed = batch_size, bucket_width, seed
    self.epoch, self.index = 0, 0
    self._plan = self._epoch_plan(0)
    self.shapes = sorted({padded_length(example_length(e), bucket_width) for e in self.examples})
    logging.info("batches: %d per epoch, %d padded lengths %s (bounded compiled shapes), "
                 "padding fraction %.3f", len(self._plan), len(self.shapes), self.shapes,
                 self.padding_fraction())

  def _epoch_plan(self, epoch: int) -> list[tuple[int, list[int]]]:
    rng = np.random.default_rng([self.seed, epoch])
    return bucketed_batches(self.examples, self.batch_size, self.bucket_width, rng)

  @property
  def batches_per_epoch(self) -> int:
    return len(self._plan)

  def padding_fraction(self) -> float:
    """Share of padded (src + tgt) positions in an epoch's batches, empty rows included."""
    real = sum(len(self.examples[i][0]) + len(self.examples[i][1]) for _, b in self._plan for i in b)
    total = sum(2 * length * self.batch_size for length, _ in self._plan)
    return 1.0 - real / max(total, 1)

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def restore(self, state: dict[str, int]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"data state was saved with seed {state['seed']}, iterator has {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._plan = self._epoch_plan(self.epoch)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index >= len(self._plan):
      self.epoch, self.index = self.epoch + 1, 0
      self._plan = self._epoch_plan(self.epoch)
    length, idx = self._plan[self.index]
    self.index += 1
    return make_batch([self.examples[i] for i in idx], self.batch_size, length)


def eval_batches(examples: Sequence[Example], batch_size: int,
                 bucket_width: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in a fixed length-sorted order, padded to full batches."""
  for length, idx in bucketed_batches(examples, batch_size, bucket_width, None):
    yield make_batch([examples[i] for i in idx], batch_size, length)
