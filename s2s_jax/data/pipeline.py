"""From raw sentence pairs to padded, length-bucketed batches of ids.

Flow: sources.load_pairs (raw text per split) -> tokenize (cached in the WORKDIR) -> filter
-> vocabularies (built on train, saved in the WORKDIR) -> ids (source reversed when asked,
</s> appended to the target) -> `BatchIterator` (training, seeded and resumable) or
`eval_batches` (fixed order).

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
import dataclasses
import hashlib
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from s2s_jax.config import DataConfig
from s2s_jax.data import sources
from s2s_jax.data import tokenize
from s2s_jax.data.sources import DataError
from s2s_jax.data.vocab import EOS_ID, PAD_ID, Vocab

SRC_VOCAB_FILE = "vocab.src.txt"
TGT_VOCAB_FILE = "vocab.tgt.txt"
TOKEN_CACHE_DIR = "tokenized"  # WORKDIR/tokenized/<split>.{src,tgt,key}: tokenized splits
CACHE_VERSION = "1"  # bump when tokenization changes in a way the cache key does not see
DEFAULT_GROWTH = DataConfig.bucket_growth

Example = tuple[list[int], list[int]]  # (source ids in encoder order, target ids ending in </s>)
TokenPair = tuple[list[str], list[str]]


@dataclasses.dataclass
class Corpus:
  """Tokenized, filtered and encoded splits plus the vocabularies.

  `stats[split]` holds the counts of `load_corpus`: pairs (read), kept, empty (dropped with
  an empty side), too_long (dropped, train only), src_tokens / tgt_tokens (kept, no </s>),
  src_oov / tgt_oov (share of those tokens that became <unk>).
  """
  src_vocab: Vocab
  tgt_vocab: Vocab
  examples: dict[str, list[Example]]  # split -> examples
  tokens: dict[str, list[TokenPair]]  # split -> kept token pairs (for analyses)
  stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


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


# ----------------------------------------------------------------------------- tokenization


def prepare_tokenizers(cfg: DataConfig, workdir: str | None,
                       raw: dict[str, list[tuple[str, str]]] | None = None
                       ) -> tuple[Callable[[str], list[str]], Callable[[str], list[str]]]:
  """(source, target) tokenizers. For sentencepiece, trains the model(s) on the raw training
  split into the WORKDIR first when they are not there yet."""
  if cfg.tokenizer == "sentencepiece":
    if not workdir:
      raise DataError("data.tokenizer=sentencepiece needs a WORKDIR to keep its model in")
    os.makedirs(workdir, exist_ok=True)
    for lang in dict.fromkeys((cfg.src_lang, cfg.tgt_lang)):
      path = tokenize.spm_model_path(workdir, lang)
      if os.path.exists(path):
        continue
      if raw is None:
        raise DataError(f"{path}: SentencePiece model not found")
      text = [s for s, _ in raw["train"]] if lang == cfg.src_lang else []
      text += [t for _, t in raw["train"]] if lang == cfg.tgt_lang else []
      t0 = time.perf_counter()
      size = tokenize.train_sentencepiece(text, cfg.spm_vocab_size, path)
      logging.info("data: SentencePiece model for %s: %d pieces (asked %d), trained on %d "
                   "sentences in %.1f s, saved to %s", lang, size, cfg.spm_vocab_size,
                   len(text), time.perf_counter() - t0, path)
  return (tokenize.tokenizer(cfg.tokenizer, cfg.src_lang, workdir),
          tokenize.tokenizer(cfg.tokenizer, cfg.tgt_lang, workdir))


def _cache_key(cfg: DataConfig, workdir: str, pairs: Sequence[tuple[str, str]]) -> str:
  """Changes whenever the tokens could: the raw text, the tokenizer, its model, the languages."""
  h = hashlib.sha256()
  parts = [CACHE_VERSION, cfg.tokenizer, cfg.src_lang, cfg.tgt_lang]
  if cfg.tokenizer == "moses":
    import sacremoses
    parts.append(getattr(sacremoses, "__version__", "?"))
  if cfg.tokenizer == "sentencepiece":
    for lang in (cfg.src_lang, cfg.tgt_lang):
      with open(tokenize.spm_model_path(workdir, lang), "rb") as f:
        parts.append(hashlib.sha256(f.read()).hexdigest())
  h.update("\t".join(parts).encode())
  for side in (0, 1):  # the sentences and their lengths (a sentence may hold a newline)
    h.update(np.fromiter((len(p[side]) for p in pairs), np.int64, len(pairs)).tobytes())
    h.update("\n".join(p[side] for p in pairs).encode())
  return f"{h.hexdigest()} {len(pairs)}"


def _read_cache(base: str, key: str, n: int) -> list[TokenPair] | None:
  try:
    with open(base + ".key", encoding="utf-8") as f:
      if f.read().strip() != key:
        return None
    sides = []
    for side in ("src", "tgt"):
      with open(f"{base}.{side}", encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
      if lines[-1] == "":
        lines.pop()
      sides.append([line.split() for line in lines])
  except (OSError, UnicodeDecodeError):
    return None
  if len(sides[0]) != n or len(sides[1]) != n:
    return None
  return list(zip(*sides))


def _write_cache(base: str, key: str, tokens: Sequence[TokenPair]) -> bool:
  """Writes the tokens (space-joined, a line each); False when a token holds whitespace."""
  texts = []
  for side in (0, 1):
    lines = [" ".join(pair[side]) for pair in tokens]
    if any(line.split() != pair[side] for line, pair in zip(lines, tokens)):
      return False
    texts.append("".join(line + "\n" for line in lines))
  os.makedirs(os.path.dirname(base), exist_ok=True)
  if os.path.exists(base + ".key"):
    os.remove(base + ".key")
  for side, text in zip(("src", "tgt"), texts):
    with open(f"{base}.{side}.tmp", "w", encoding="utf-8", newline="") as f:
      f.write(text)
    os.replace(f"{base}.{side}.tmp", f"{base}.{side}")
  with open(base + ".key.tmp", "w", encoding="utf-8") as f:
    f.write(key + "\n")
  os.replace(base + ".key.tmp", base + ".key")  # last: the cache is valid only once complete
  return True


def tokenize_split(cfg: DataConfig, workdir: str | None, split: str,
                   pairs: Sequence[tuple[str, str]], tok_src: Callable[[str], list[str]],
                   tok_tgt: Callable[[str], list[str]]) -> list[TokenPair]:
  """Token pairs of one split, read from WORKDIR/tokenized when the cache matches the text."""
  t0 = time.perf_counter()
  base = os.path.join(workdir, TOKEN_CACHE_DIR, split) if workdir else ""
  key = _cache_key(cfg, workdir, pairs) if workdir else ""
  if base:
    cached = _read_cache(base, key, len(pairs))
    if cached is not None:
      logging.info("data %s: %d tokenized pairs read from %s.* in %.1f s", split, len(cached),
                   base, time.perf_counter() - t0)
      return cached
  tokens = [(tok_src(s), tok_tgt(t)) for s, t in pairs]
  cached = bool(base) and _write_cache(base, key, tokens)
  logging.info("data %s: tokenized %d pairs (%s) in %.1f s%s", split, len(pairs), cfg.tokenizer,
               time.perf_counter() - t0, f", cached in {base}.*" if cached else "")
  return tokens


# ----------------------------------------------------------------------------- the corpus


def within_length(src: Sequence[str], tgt: Sequence[str], max_len: int | None) -> bool:
  """Whether a pair has at most max_len tokens a side (</s> not counted); None: no limit."""
  return max_len is None or (len(src) <= max_len and len(tgt) <= max_len)


def filter_pairs(tokens: Sequence[TokenPair],
                 max_len: int | None) -> tuple[list[TokenPair], int, int]:
  """(kept pairs, #dropped with an empty side, #dropped longer than max_len); None: no limit."""
  kept, empty, long = [], 0, 0
  for st, tt in tokens:
    if not st or not tt:
      empty += 1
    elif not within_length(st, tt, max_len):
      long += 1
    else:
      kept.append((st, tt))
  return kept, empty, long


def build_or_load_vocabs(cfg: DataConfig, workdir: str | None,
                         train: Sequence[TokenPair]) -> tuple[Vocab, Vocab]:
  """The WORKDIR's vocabularies if it has them, else new ones from `train` (saved there)."""
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
  src_vocab = Vocab.build((s for s, _ in train), cfg.src_vocab_size)
  tgt_vocab = Vocab.build((t for _, t in train), cfg.tgt_vocab_size)
  if paths:
    os.makedirs(workdir, exist_ok=True)
    src_vocab.save(paths[0])
    tgt_vocab.save(paths[1])
  logging.info("data: vocabularies of %d source and %d target ids (limits %d and %d plus 4 "
               "specials)%s", len(src_vocab), len(tgt_vocab), cfg.src_vocab_size,
               cfg.tgt_vocab_size, f", saved to {paths[0]} and {paths[1]}" if paths else "")
  return src_vocab, tgt_vocab


def load_corpus(cfg: DataConfig, workdir: str | None) -> Corpus:
  """Loads every split; builds the vocabularies on train (or reloads them from `workdir`).

  With a `workdir`, tokenized splits are cached in WORKDIR/tokenized (reused while the raw
  text and tokenizer are unchanged), and the vocabularies (and SentencePiece models) are kept
  there for decoding.
  """
  t0 = time.perf_counter()
  raw = sources.load_pairs(cfg)
  missing = [s for s in sources.SPLITS if s not in raw]
  if missing:
    raise DataError(f"data.source={cfg.source} gave no {', '.join(missing)} split")
  tok_src, tok_tgt = prepare_tokenizers(cfg, workdir, raw)
  tokens: dict[str, list[TokenPair]] = {}
  stats: dict[str, dict[str, float]] = {}
  for split, pairs in raw.items():
    toks = tokenize_split(cfg, workdir, split, pairs, tok_src, tok_tgt)
    limit = cfg.max_len if split == "train" and cfg.max_len > 0 else None
    kept, empty, long = filter_pairs(toks, limit)
    logging.info("data %s: %d pairs read, %d kept; dropped %d with an empty side, %s", split,
                 len(pairs), len(kept), empty,
                 f"{long} with more than {limit} tokens on a side" if limit is not None
                 else "none for length (no length limit here)")
    tokens[split] = kept
    stats[split] = {"pairs": len(pairs), "kept": len(kept), "empty": empty, "too_long": long}
  if not tokens["train"]:
    s = stats["train"]
    raise DataError(f"no training pairs left: {s['pairs']} read, {s['empty']} with an empty side, "
                    f"{s['too_long']} longer than data.max_len={cfg.max_len}")
  src_vocab, tgt_vocab = build_or_load_vocabs(cfg, workdir, tokens["train"])
  examples = {}
  for split, pairs in tokens.items():
    examples[split] = [encode_pair(s, t, src_vocab, tgt_vocab, cfg.reverse_source)
                       for s, t in pairs]
    st = stats[split]
    st["src_tokens"] = sum(len(s) for s, _ in pairs)
    st["tgt_tokens"] = sum(len(t) for _, t in pairs)
    st["src_oov"] = src_vocab.oov_rate(s for s, _ in pairs)
    st["tgt_oov"] = tgt_vocab.oov_rate(t for _, t in pairs)
    logging.info("data %s: %d source / %d target tokens, OOV rate source %.4f, target %.4f",
                 split, st["src_tokens"], st["tgt_tokens"], st["src_oov"], st["tgt_oov"])
  logging.info("data: corpus ready in %.1f s", time.perf_counter() - t0)
  return Corpus(src_vocab, tgt_vocab, examples, tokens, stats)


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


def make_batch(examples: Sequence[Example], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """A BxL batch; rows past len(examples) are all padding (they add nothing to the loss)."""
  src = np.full((batch_size, length), PAD_ID, np.int32)
  tgt = np.full((batch_size, length), PAD_ID, np.int32)
  for i, (s, t) in enumerate(examples):
    src[i, :len(s)] = s
    tgt[i, :len(t)] = t
  return {"src": src, "tgt": tgt}


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
    lengths = np.fromiter((example_length(e) for e in examples), np.int64, len(examples))
  if rng is None:
    order = np.argsort(lengths, kind="stable")
  else:
    order = np.lexsort((rng.random(len(lengths)), lengths))
  bounds = bucket_lengths(int(lengths.max()) if len(lengths) else 1, bucket_width, bucket_growth)
  batches = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    batches.append((bounds[bisect.bisect_left(bounds, int(lengths[idx[-1]]))], idx))
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def padding_fraction(examples: Sequence[Example], batches: Sequence[tuple[int, Sequence[int]]],
                     batch_size: int) -> float:
  """Share of padded (src + tgt) positions in `batches`, empty rows included."""
  real = sum(len(examples[i][0]) + len(examples[i][1]) for _, b in batches for i in b)
  total = sum(2 * length * batch_size for length, _ in batches)
  return 1.0 - real / max(total, 1)


class BatchIterator:
  """Endless training batches, epoch after epoch, reproducible from (seed, epoch, index).

  `state()` is a small dict saved with checkpoints; `restore(state)` makes the iterator yield
  exactly the batches an uninterrupted run would have yielded next. An epoch has the same
  batch lengths every time (`shapes`); only which sentences share a batch changes.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, bucket_width: int, seed: int,
               bucket_growth: float = DEFAULT_GROWTH):
    if not examples:
      raise ValueError("no training examples left after filtering")
    self.examples = list(examples)
    self.batch_size, self.bucket_width, self.seed = batch_size, bucket_width, seed
    self.bucket_growth = bucket_growth
    self._lengths = np.fromiter((example_length(e) for e in self.examples), np.int64,
                                len(self.examples))
    self.epoch, self.index = 0, 0
    self._plan = self._epoch_plan(0)
    self.shapes = sorted({length for length, _ in self._plan})
    logging.info("batches: %d per epoch of %d sentences, %d padded lengths %s (the compiled "
                 "shapes), padding fraction %.3f", len(self._plan), batch_size, len(self.shapes),
                 self.shapes, self.padding_fraction())

  def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    return bucketed_batches(self.examples, self.batch_size, self.bucket_width, rng,
                            self.bucket_growth, self._lengths)

  @property
  def batches_per_epoch(self) -> int:
    return len(self._plan)

  def padding_fraction(self) -> float:
    """Share of padded (src + tgt) positions in an epoch's batches, empty rows included."""
    return padding_fraction(self.examples, self._plan, self.batch_size)

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


def eval_batches(examples: Sequence[Example], batch_size: int, bucket_width: int,
                 bucket_growth: float = DEFAULT_GROWTH) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in a fixed length-sorted order, padded to full batches."""
  if not examples:
    return
  for length, idx in bucketed_batches(examples, batch_size, bucket_width, None, bucket_growth):
    yield make_batch([examples[i] for i in idx], batch_size, length)
