"""From a corpus to padded, length-bucketed batches of ids.

Flow: sources.open_streams (raw text per split, read in chunks) -> prepared.prepare (tokenized
once, in parallel, into memory-mapped token ids in the shared data store) -> filter ->
vocabularies (built on train, saved in the WORKDIR) -> `Examples` (ids on demand: source
reversed when asked, </s> appended to the target) -> `BatchIterator` (training, seeded and
resumable) or `eval_batches` (fixed order). Batching takes `Examples` or plain lists of
`Example`s and gives the same batches for both.

Filtering: a pair with an empty side (after tokenization) is dropped from every split; a
training pair with more than `max_len` tokens on either side (</s> not counted) is dropped
too. Validation and test pairs are never dropped for length: evaluation covers every
sentence, as the paper's BLEU does. Both counts are logged and returned in `Corpus.stats`.

Source reversal: the source token list (without any end symbol; the encoder input has no
</s>) is reversed word by word; the target is never reversed and always ends with </s>.
So for "A B C" -> "W X Y" the encoder reads C B A and the decoder emits W X Y </s>.

Batching: the examples are sorted by length (source or target with its </s>, whichever is
longer; random order among equal lengths) and cut into full batches, so only one batch an
epoch has empty rows. A batch is padded to the smallest "bucket length" that holds its
longest example. Bucket lengths are multiples of `bucket_width`, and each is at least
(1 + `bucket_growth`) times the one before: the relative padding stays about the same at
every length, and a corpus with a long tail still compiles only a few shapes (about
log(max length) / log(1 + growth)). Source and target share the batch's length.
"""

from __future__ import annotations

import bisect
import collections.abc
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import math
import os
import queue
import shutil
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from s2s_jax.config import DataConfig
from s2s_jax.data import prepared as prepared_lib
from s2s_jax.data import sources, tokenize
from s2s_jax.data.sources import DataError
from s2s_jax.data.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab

SRC_VOCAB_FILE = "vocab.src.txt"
TGT_VOCAB_FILE = "vocab.tgt.txt"
DEFAULT_GROWTH = DataConfig.bucket_growth

Example = tuple[list[int], list[int]]  # (source ids in encoder order, target ids ending in </s>)
TokenPair = tuple[list[str], list[str]]


def encode_pair(src_toks: Sequence[str], tgt_toks: Sequence[str], src_vocab: Vocab,
                tgt_vocab: Vocab, reverse_source: bool) -> Example:
  """Ids for one pair: the source reversed if asked, </s> appended to the target."""
  return encode_source(src_toks, src_vocab, reverse_source), tgt_vocab.encode(tgt_toks) + [EOS_ID]


def encode_source(src_toks: Sequence[str], src_vocab: Vocab, reverse_source: bool) -> list[int]:
  """Encoder input ids: no </s>; reversed word by word if `reverse_source`."""
  src = src_vocab.encode(src_toks)
  return src[::-1] if reverse_source else src


def load_vocabs(workdir: str) -> tuple[Vocab, Vocab]:
  return (Vocab.load(os.path.join(workdir, SRC_VOCAB_FILE)),
          Vocab.load(os.path.join(workdir, TGT_VOCAB_FILE)))


# ----------------------------------------------------------------------------- the corpus


def within_length(src: Sequence[str], tgt: Sequence[str], max_len: int | None) -> bool:
  """Whether a pair has at most max_len tokens a side (</s> not counted); None: no limit."""
  return max_len is None or (len(src) <= max_len and len(tgt) <= max_len)


class _Rows(collections.abc.Sequence):
  """A read-only sequence over some rows of a prepared split; equal to any sequence (a list,
  say) with the same items."""
  rows: np.ndarray

  def __len__(self) -> int:
    return len(self.rows)

  def __eq__(self, other) -> bool:
    if not isinstance(other, collections.abc.Sequence):
      return NotImplemented
    return len(other) == len(self) and all(a == b for a, b in zip(self, other))

  __hash__ = None


class Examples(_Rows):
  """The encoded examples of one split, read from the memory-mapped prepared corpus on demand.

  examples[i] is the `Example` (source ids in encoder order, target ids ending in </s>) of
  the i-th kept pair; `lengths` and `batch` give the batching code what it needs without
  building a Python list per sentence.
  """

  def __init__(self, split: prepared_lib.SplitIds, rows: np.ndarray,
               lookups: tuple[np.ndarray, np.ndarray], reverse_source: bool):
    self.split, self.rows, self.lookups = split, rows, lookups
    self.reverse_source = reverse_source
    self.src_lengths = np.diff(split.offsets[0])[rows].astype(np.int32)
    self.tgt_lengths = np.diff(split.offsets[1])[rows].astype(np.int32) + 1  # with </s>

  def __getitem__(self, i):
    if isinstance(i, slice):
      return Examples(self.split, self.rows[i], self.lookups, self.reverse_source)
    src, tgt = self.arrays(int(self.rows[i]))
    return src.tolist(), tgt.tolist() + [EOS_ID]

  def arrays(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input ids, target ids without </s>) of corpus row `row`; a DataError naming
    the file when the store holds an id beyond its token table."""
    src = self._map(0, self.split.sentence(0, row), lambda _: row)
    tgt = self._map(1, self.split.sentence(1, row), lambda _: row)
    return (src[::-1] if self.reverse_source else src), tgt

  def _map(self, side: int, ids: np.ndarray, row_of: Callable[[int], int]) -> np.ndarray:
    """Store ids of one side as vocabulary ids; a DataError naming the file when one is beyond
    the token table (`row_of(i)`: the corpus row of ids[i])."""
    table = self.lookups[side]
    if len(ids) and int(ids.max()) >= len(table):
      bad = row_of(int(np.argmax(ids >= len(table))))
      raise self.split.out_of_table(int(bad), [len(t) for t in self.lookups])
    return table[ids]

  @property
  def lengths(self) -> np.ndarray:
    """`example_length` of every example."""
    return np.maximum(self.src_lengths, self.tgt_lengths).astype(np.int64)

  def num_tokens(self, idx: np.ndarray) -> int:
    """Source plus target positions (</s> included) of the examples `idx`."""
    return int(self.src_lengths[idx].sum()) + int(self.tgt_lengths[idx].sum())

  def batch(self, idx: Sequence[int], batch_size: int, length: int,
            rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """`make_batch` of the examples `idx`, filling only the batch rows `rows` (the others stay
    padding: a host reads only the sentences of the rows its devices get). Vectorised: the
    ids of all its sentences are gathered, mapped and scattered at once; a DataError naming
    the file when the store holds an id beyond its token table."""
    lo, hi, _ = rows.indices(batch_size)
    hi = max(lo, min(hi, len(idx)))
    corpus_rows = self.rows[np.asarray(idx[lo:hi], np.int64)]
    batch = {}
    for name, side, reverse in (("src", 0, self.reverse_source), ("tgt", 1, False)):
      ids, lengths, within = self.split.gather(side, corpus_rows, reverse)
      vocab_ids = self._map(side, ids, lambda i: np.repeat(corpus_rows, lengths)[i])
      batch[name] = np.full((batch_size, length), PAD_ID, np.int32)
      _fill(batch[name], lo, lengths, vocab_ids, within)
    batch["tgt"][np.arange(lo, hi), lengths] = EOS_ID  # after the target (the last side)
    return batch


class TokenPairs(_Rows):
  """The kept token pairs of one split, as lists of strings, read on demand (for analyses)."""

  def __init__(self, split: prepared_lib.SplitIds, rows: np.ndarray,
               tables: tuple[list[str], list[str]]):
    self.split, self.rows, self.tables = split, rows, tables

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    row = int(self.rows[i])
    return tuple([self.tables[k][j] for j in self.split.sentence(k, row).tolist()] for k in (0, 1))


@dataclasses.dataclass
class Corpus:
  """The prepared splits (memory-mapped ids), the vocabularies and the examples per split.

  `stats[split]` holds the counts of `load_corpus`: pairs (read), kept, empty (dropped with
  an empty side), too_long (dropped, train only), src_tokens / tgt_tokens (kept, no </s>),
  src_oov / tgt_oov (share of those tokens that became <unk>). `content_key` changes whenever
  the text could (`sources.open_streams`' identity), wherever the corpus lies; `name` says
  where it was read from.
  """
  src_vocab: Vocab
  tgt_vocab: Vocab
  examples: dict[str, Examples]  # split -> examples
  tokens: dict[str, TokenPairs]  # split -> kept token pairs (read on demand)
  stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  prepared: prepared_lib.Prepared | None = None
  content_key: str = ""
  name: str = ""


def corpus_name(cfg: DataConfig) -> str:
  """Where a corpus is read from, for messages."""
  if cfg.source == "text":
    return os.path.abspath(cfg.path)
  if cfg.source == "tfds":
    return f"tfds {cfg.tfds_name}"
  return (f"synthetic ({cfg.synthetic_train}/{cfg.synthetic_valid}/{cfg.synthetic_test} pairs, "
          f"seed {cfg.synthetic_seed})")


def kept_rows(split: prepared_lib.SplitIds,
              max_len: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(kept row indices, dropped row indices, #dropped with an empty side, #dropped longer
  than max_len)."""
  ls, lt = split.lengths(0), split.lengths(1)
  nonempty = (ls > 0) & (lt > 0)
  keep = nonempty if max_len is None else nonempty & (ls <= max_len) & (lt <= max_len)
  empty = int(len(ls) - nonempty.sum())
  return np.flatnonzero(keep), np.flatnonzero(~keep), empty, int(nonempty.sum() - keep.sum())


def _spm_models(cfg: DataConfig, workdir: str | None, streams: dict[str, sources.Stream],
                text_identity: str) -> str | None:
  """The folder with the SentencePiece models (the WORKDIR), training them there first when
  they are missing (from an even sample of the training split, cached in the data store)."""
  if cfg.tokenizer != "sentencepiece":
    return None
  if not workdir:
    raise DataError("data.tokenizer=sentencepiece needs a WORKDIR to keep its model in")
  os.makedirs(workdir, exist_ok=True)
  langs = list(dict.fromkeys((cfg.src_lang, cfg.tgt_lang)))
  if all(os.path.exists(tokenize.spm_model_path(workdir, lang)) for lang in langs):
    return workdir
  key = prepared_lib.corpus_key(text_identity, f"spm {cfg.spm_vocab_size} {' '.join(langs)}")
  shared = os.path.join(prepared_lib.store_dir(cfg), f"spm-{key}")
  os.makedirs(shared, exist_ok=True)
  for lang in langs:
    path = tokenize.spm_model_path(shared, lang)
    if not os.path.exists(path):
      sides = [k for k, side_lang in enumerate((cfg.src_lang, cfg.tgt_lang)) if side_lang == lang]
      text = [t for k in sides for t in prepared_lib.sample_text(
          streams["train"], k, tokenize.SPM_INPUT_SENTENCES // len(sides))]
      t0 = time.perf_counter()
      size = tokenize.train_sentencepiece(text, cfg.spm_vocab_size, path)
      logging.info("data: SentencePiece model for %s: %d pieces (asked %d), trained on %d "
                   "sentences in %.1f s, saved to %s", lang, size, cfg.spm_vocab_size,
                   len(text), time.perf_counter() - t0, path)
    target = tokenize.spm_model_path(workdir, lang)
    if not os.path.exists(target):
      shutil.copyfile(path, target + ".tmp")
      os.replace(target + ".tmp", target)
  return workdir


def _vocabs(cfg: DataConfig, workdir: str | None, prep: prepared_lib.Prepared,
            train_counts: tuple[np.ndarray, np.ndarray]) -> tuple[Vocab, Vocab]:
  """The WORKDIR's vocabularies if it has them, else new ones from the kept training pairs
  (saved there for decoding)."""
  paths = [os.path.join(workdir, f) for f in (SRC_VOCAB_FILE, TGT_VOCAB_FILE)] if workdir else []
  if paths and all(os.path.exists(p) for p in paths):
    vocabs = load_vocabs(workdir)
    for path, vocab, size, name in zip(paths, vocabs, (cfg.src_vocab_size, cfg.tgt_vocab_size),
                                       ("src", "tgt")):
      if len(vocab) > size + 4:
        raise DataError(f"{path} has {len(vocab) - 4} words but data.{name}_vocab_size={size}: "
                        "this WORKDIR was made with other settings; use a fresh WORKDIR")
    logging.info("data: vocabularies reloaded from %s (%d source, %d target ids)", workdir,
                 len(vocabs[0]), len(vocabs[1]))
    return vocabs
  src_vocab = prep.vocab(0, cfg.src_vocab_size, train_counts[0])
  tgt_vocab = prep.vocab(1, cfg.tgt_vocab_size, train_counts[1])
  if paths:
    os.makedirs(workdir, exist_ok=True)
    src_vocab.save(paths[0])
    tgt_vocab.save(paths[1])
  logging.info("data: vocabularies of %d source and %d target ids (limits %d and %d plus 4 "
               "specials)%s", len(src_vocab), len(tgt_vocab), cfg.src_vocab_size,
               cfg.tgt_vocab_size, f", saved to {paths[0]} and {paths[1]}" if paths else "")
  return src_vocab, tgt_vocab


def load_corpus(cfg: DataConfig, workdir: str | None, progress: bool = False) -> Corpus:
  """Opens (preparing it once if needed) the corpus in the data store, and encodes it.

  Vocabularies come from the WORKDIR when it has them, else from the kept training pairs
  (and are saved there with any SentencePiece models, for decoding). `progress`: a progress
  bar while preparing.
  """
  t0 = time.perf_counter()
  streams, identity = sources.open_streams(cfg, prepared_lib.store_dir(cfg))
  model_dir = _spm_models(cfg, workdir, streams, identity)
  prep = prepared_lib.prepare(cfg, streams, identity, model_dir, progress)
  rows, dropped, stats = {}, {}, {}
  for split in sources.SPLITS:
    ids = prep.splits[split]
    limit = cfg.max_len if split == "train" and cfg.max_len > 0 else None
    kept, dropped[split], empty, long = kept_rows(ids, limit)
    logging.info("data %s: %d pairs read, %d kept; dropped %d with an empty side, %s", split,
                 len(ids), len(kept), empty,
                 f"{long} with more than {limit} tokens on a side" if limit is not None
                 else "none for length (no length limit here)")
    rows[split] = kept
    stats[split] = {"pairs": len(ids), "kept": len(kept), "empty": empty, "too_long": long}
  if not len(rows["train"]):
    s = stats["train"]
    raise DataError(f"no training pairs left: {s['pairs']} read, {s['empty']} with an empty side, "
                    f"{s['too_long']} longer than data.max_len={cfg.max_len}")
  counts = {split: [prep.kept_counts(split, k, dropped[split]) for k in (0, 1)]
            for split in sources.SPLITS}
  vocabs = _vocabs(cfg, workdir, prep, counts["train"])
  lookups = (prep.lookup(0, vocabs[0]), prep.lookup(1, vocabs[1]))
  examples, tokens = {}, {}
  for split, kept in rows.items():
    ids = prep.splits[split]
    examples[split] = Examples(ids, kept, lookups, cfg.reverse_source)
    tokens[split] = TokenPairs(ids, kept, prep.tables)
    st = stats[split]
    for k, side in enumerate(("src", "tgt")):
      c = counts[split][k]
      st[f"{side}_tokens"] = int(c.sum())
      st[f"{side}_oov"] = float(c[lookups[k] == UNK_ID].sum()) / max(int(c.sum()), 1)
    logging.info("data %s: %d source / %d target tokens, OOV rate source %.4f, target %.4f",
                 split, st["src_tokens"], st["tgt_tokens"], st["src_oov"], st["tgt_oov"])
  logging.info("data: corpus ready in %.1f s", time.perf_counter() - t0)
  content_key = hashlib.sha256(identity.encode()).hexdigest()[:20]
  return Corpus(vocabs[0], vocabs[1], examples, tokens, stats, prep, content_key,
                corpus_name(cfg))


# ----------------------------------------------------------------------------- batching


def bucket_lengths(max_length: int, bucket_width: int,
                   bucket_growth: float = DEFAULT_GROWTH) -> list[int]:
  """The padded lengths, in order, up to the first one >= `max_length`.

  They start at `bucket_width` and step by `bucket_width` times max(1, ceil(growth x length /
  width)): multiples of the width, each at least (1 + growth) x the previous one once the
  lengths are long enough (growth 0: every multiple of the width).
  """
  if bucket_width < 1 or bucket_growth < 0:
    raise ValueError(f"bucket_width must be >= 1 and bucket_growth >= 0, got {bucket_width}, "
                     f"{bucket_growth}")
  out = [bucket_width]
  while out[-1] < max_length:
    steps = max(1, math.ceil(round(out[-1] * bucket_growth / bucket_width, 9)))
    out.append(out[-1] + steps * bucket_width)
  return out


def padded_length(n: int, bucket_width: int, bucket_growth: float = DEFAULT_GROWTH) -> int:
  """The smallest bucket length that holds `n` positions."""
  bounds = bucket_lengths(n, bucket_width, bucket_growth)
  return bounds[bisect.bisect_left(bounds, n)]


def example_length(ex: Example) -> int:
  """Source and target share one padded length, so the set of shapes stays small."""
  return max(len(ex[0]), len(ex[1]))


def example_lengths(examples: Sequence[Example]) -> np.ndarray:
  if isinstance(examples, Examples):
    return examples.lengths
  return np.fromiter((example_length(e) for e in examples), np.int64, len(examples))


def _fill(out: np.ndarray, first_row: int, lengths: np.ndarray, values: np.ndarray,
          within: np.ndarray | None = None) -> None:
  """Writes sentences into the rows of `out` from `first_row` on, each from column 0: their
  `lengths`, their ids concatenated in `values`, and (if known) each id's position `within`
  its sentence."""
  if within is None:
    within = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  starts = np.arange(first_row, first_row + len(lengths)) * out.shape[1]
  out.reshape(-1)[np.repeat(starts, lengths) + within] = values


def make_batch(examples: Sequence[Example], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """A BxL batch; rows past len(examples) are all padding (they add nothing to the loss)."""
  batch = {}
  for name, side in (("src", 0), ("tgt", 1)):
    lengths = np.fromiter((len(ex[side]) for ex in examples), np.int64, len(examples))
    values = np.fromiter(itertools.chain.from_iterable(ex[side] for ex in examples), np.int64,
                         int(lengths.sum()))
    batch[name] = np.full((batch_size, length), PAD_ID, np.int32)
    _fill(batch[name], 0, lengths, values)
  return batch


def batch_of(examples: Sequence[Example], idx: Sequence[int], batch_size: int, length: int,
             rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """The batch of examples `idx`; only the batch rows `rows` are filled (the rest is padding)."""
  if isinstance(examples, Examples):
    return examples.batch(idx, batch_size, length, rows)
  lo, hi, _ = rows.indices(batch_size)
  batch = make_batch([examples[i] for i in idx[lo:hi]], hi - lo, length)
  if (lo, hi) == (0, batch_size):
    return batch
  full = {k: np.full((batch_size, length), PAD_ID, np.int32) for k in batch}
  for k in batch:
    full[k][lo:hi] = batch[k]
  return full


def bucketed_batches(examples: Sequence[Example], batch_size: int, bucket_width: int,
                     rng: np.random.Generator | None, bucket_growth: float = DEFAULT_GROWTH,
                     lengths: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
  """(padded length, example indices) batches of similar length; every example exactly once.

  The examples are sorted by length and cut into batches of `batch_size` (the last one may
  be short). With `rng`, equal lengths are in random order and the batch order is shuffled;
  without it, the order is deterministic (shortest first, stable). `lengths`: the examples'
  `example_length`s, if already known.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if lengths is None:
    lengths = example_lengths(examples)
  if rng is None:
    order = np.argsort(lengths, kind="stable")
  else:  # == np.lexsort((rng.random(n), lengths)) in two sorts, each several times faster
    keys = rng.random(len(lengths))
    ties = np.argsort(keys)  # not stable, which only equal keys could tell: then sort again
    if len(keys) > 1 and not (keys[ties[1:]] > keys[ties[:-1]]).all():
      ties = np.argsort(keys, kind="stable")
    order = ties[np.argsort(_small_ints(lengths)[ties], kind="stable")]  # radix: small ints
  padded = batch_lengths(lengths[order], batch_size, bucket_width, bucket_growth)
  batches = [(int(length), order[start:start + batch_size])
             for start, length in zip(range(0, len(order), batch_size), padded)]
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def batch_lengths(sorted_lengths: np.ndarray, batch_size: int, bucket_width: int,
                  bucket_growth: float = DEFAULT_GROWTH) -> np.ndarray:
  """The padded length of each batch when `sorted_lengths` are cut every `batch_size`."""
  n = len(sorted_lengths)
  bounds = bucket_lengths(int(sorted_lengths[-1]) if n else 1, bucket_width, bucket_growth)
  last = sorted_lengths[np.minimum(np.arange(batch_size, n + batch_size, batch_size), n) - 1]
  return np.asarray(bounds)[np.searchsorted(bounds, last, side="left")]


def _small_ints(values: np.ndarray) -> np.ndarray:
  """`values` (>= 0) in the smallest unsigned type that holds them."""
  top = int(values.max()) if len(values) else 0
  return values.astype(np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32)


def padding_fraction(examples: Sequence[Example], batches: Sequence[tuple[int, Sequence[int]]],
                     batch_size: int) -> float:
  """Share of padded (src + tgt) positions in `batches`, empty rows included."""
  real = _num_tokens(examples, np.concatenate([b for _, b in batches]) if batches else [])
  total = sum(2 * length * batch_size for length, _ in batches)
  return 1.0 - real / max(total, 1)


def _num_tokens(examples: Sequence[Example], idx: Sequence[int] | None = None) -> int:
  """Source plus target positions of the examples `idx` (None: all of them)."""
  if isinstance(examples, Examples):
    return examples.num_tokens(slice(None) if idx is None else np.asarray(idx, np.int64))
  chosen = examples if idx is None else (examples[i] for i in idx)
  return sum(len(s) + len(t) for s, t in chosen)


class BatchIterator:
  """Endless training batches, epoch after epoch, reproducible from (seed, epoch, index).

  `state()` is a small dict saved with checkpoints; `restore(state)` makes the iterator yield
  exactly the batches an uninterrupted run would have yielded next. An epoch has the same
  batch lengths every time (`shapes`); only which sentences share a batch changes. An epoch's
  plan (a sort of every example) is made in a background thread, so that on a large corpus it
  overlaps the model's initialization and compilation; the first batch waits for it.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, bucket_width: int, seed: int,
               bucket_growth: float = DEFAULT_GROWTH, rows: slice = slice(None)):
    if not len(examples):
      raise ValueError("no training examples left after filtering")
    self.examples = examples if isinstance(examples, Examples) else list(examples)
    self.batch_size, self.bucket_width, self.seed = batch_size, bucket_width, seed
    self.bucket_growth, self.rows = bucket_growth, rows  # rows: the batch rows this host fills
    self._lengths = example_lengths(self.examples)
    self.epoch, self.index = 0, 0
    self.last_words = 0  # source + target words of the last batch, all its rows (`count_words`)
    self._planner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch-plan")
    self._plan_of: tuple[int, concurrent.futures.Future] | None = None
    self._start_plan()
    # Batch lengths do not depend on the shuffle: the sorted lengths, cut every batch_size.
    self._batch_lengths = batch_lengths(np.sort(_small_ints(self._lengths)), batch_size,
                                        bucket_width, bucket_growth)
    self.shapes = sorted({int(n) for n in self._batch_lengths})
    logging.info("batches: %d per epoch of %d sentences, %d padded lengths %s (the compiled "
                 "shapes), padding fraction %.3f", self.batches_per_epoch, batch_size,
                 len(self.shapes), self.shapes, self.padding_fraction())

  def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    return bucketed_batches(self.examples, self.batch_size, self.bucket_width, rng,
                            self.bucket_growth, self._lengths)

  def _start_plan(self) -> concurrent.futures.Future:
    """The background job making this epoch's plan, started unless it already is."""
    if self._plan_of is None or self._plan_of[0] != self.epoch:
      if self._plan_of is not None:
        self._plan_of[1].cancel()
      self._plan_of = self.epoch, self._planner.submit(self._epoch_plan, self.epoch)
    return self._plan_of[1]

  @property
  def batches_per_epoch(self) -> int:
    return len(self._batch_lengths)

  def padding_fraction(self) -> float:
    """Share of padded (src + tgt) positions in an epoch's batches, empty rows included."""
    total = int(self._batch_lengths.sum()) * 2 * self.batch_size
    return 1.0 - _num_tokens(self.examples) / max(total, 1)

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "num_examples": len(self.examples)}

  def restore(self, state: dict[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"data state was saved with seed {state['seed']}, iterator has {self.seed}")
    if int(state.get("num_examples", len(self.examples))) != len(self.examples):
      raise ValueError(f"data state was saved for {state['num_examples']} training examples, "
                       f"the corpus now has {len(self.examples)}: the data changed since the "
                       "checkpoint")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._start_plan()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index >= self.batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    length, idx = self._start_plan().result()[self.index]
    self.index += 1
    self.last_words = _num_tokens(self.examples, idx) - len(idx)  # no </s>
    return batch_of(self.examples, idx, self.batch_size, length, self.rows)


class Prefetcher:
  """The batches of a `BatchIterator` made ahead on a background thread: each is passed
  through `prepare` there (the training loop counts its words and places it on the devices),
  handed over `chunk` at a time (one thread switch per chunk, not per batch), at most `depth`
  chunks waiting, so the next step's batch is ready when the current step is queued.

  The batches, their order and `restore` are the iterator's; `epoch`, `index` and `state()`
  are its position after the batches handed out so far (not the ones made ahead), so a
  checkpoint resumes exactly after the last batch trained on. An error of the iterator or of
  `prepare` is raised by the `next` that would have returned that batch.
  """

  def __init__(self, batches: BatchIterator, prepare: Callable[[dict[str, np.ndarray]], Any],
               depth: int = 2, chunk: int = 4):
    self.batches, self.prepare, self.depth, self.chunk = batches, prepare, depth, chunk
    self.epoch, self.index = batches.epoch, batches.index
    self._ready: collections.deque = collections.deque()  # handed over, not yet returned
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._ahead = False  # the iterator is past `state()` (batches made ahead were dropped)

  @property
  def batches_per_epoch(self) -> int:
    return self.batches.batches_per_epoch

  def _work(self, out: queue.Queue, stop: threading.Event) -> None:
    failed = False
    while not stop.is_set() and not failed:
      items = []
      while len(items) < self.chunk and not failed:
        try:
          batch = next(self.batches)
          items.append((True, (self.prepare(batch), self.batches.epoch, self.batches.index)))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
          items.append((False, e))
          failed = True
      while not stop.is_set():
        try:
          out.put(items, timeout=0.1)
          break
        except queue.Full:
          continue

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._thread is None:
      if self._ahead:
        self.batches.restore(self.state())
        self._ahead = False
      self._queue, self._stop = queue.Queue(self.depth), threading.Event()
      self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop),
                                      name="batch-prefetch", daemon=True)
      self._thread.start()
    if not self._ready:
      self._ready.extend(self._queue.get())
    ok, payload = self._ready.popleft()
    if not ok:
      self.close()
      raise payload
    value, self.epoch, self.index = payload
    return value

  def state(self) -> dict[str, int]:
    return {**self.batches.state(), "epoch": self.epoch, "index": self.index}

  def restore(self, state: dict[str, Any]) -> None:
    self.close()
    self.batches.restore(state)
    self.epoch, self.index, self._ahead = self.batches.epoch, self.batches.index, False

  def close(self) -> None:
    """Stops the background thread; the batches it made ahead are dropped, and a later `next`
    continues from `state()`."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread, self._ahead = None, True
    self._ready.clear()


def eval_batches(examples: Sequence[Example], batch_size: int, bucket_width: int,
                 bucket_growth: float = DEFAULT_GROWTH,
                 rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in a fixed length-sorted order, padded to full batches."""
  if not len(examples):
    return
  for length, idx in bucketed_batches(examples, batch_size, bucket_width, None, bucket_growth):
    yield batch_of(examples, idx, batch_size, length, rows)
