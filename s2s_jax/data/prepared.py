"""Prepared corpora: every split tokenized once, in parallel, into flat memory-mapped token ids.

A prepared corpus is a folder in the data store (data.prepared_dir, else $S2S_JAX_DATA, else
~/.cache/s2s_jax/prepared) named `<source>-<key>`, where the key hashes the text (file
contents, TFDS version and sizes, or the generator settings), the tokenizer and its model,
and the format version. Any number of WORKDIRs and hosts share it:

  meta.json              sizes per split, written last (a folder without it is never used)
  tokens.{src,tgt}.txt   the token table: token string of store id i on line i + 1
  rank.{src,tgt}.npy     uint32 rank of each token in code point order (vocabulary ties)
  counts.{src,tgt}.npy   int64 count of each token in the training split
  <split>.{src,tgt}.ids  uint32 store ids of all sentences of the split, concatenated
  <split>.{src,tgt}.offsets.npy  int64 start of sentence i (n + 1 entries)

Store ids are not vocabulary ids: a run maps them through a lookup table built from its own
vocabulary settings (`Prepared.lookup`), so one prepared corpus serves every vocabulary size
and length limit. A damaged store is a `DataError` naming the file: sizes and offsets are
checked when it is opened, the ids of the validation and test splits when they are counted,
and a training sentence's ids when a batch takes it (an id beyond the token table is never
clipped). Preparation reads the text in chunks (never a whole split), tokenizes them
in a process pool and writes into a temporary folder that is renamed into place at the end:
an interrupted preparation leaves nothing that a later run mistakes for a complete corpus.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from s2s_jax.config import DataConfig
from s2s_jax.data import moses, sources, tokenize
from s2s_jax.data.sources import DataError
from s2s_jax.data.vocab import SPECIALS, Vocab

FORMAT_VERSION = "1"  # bump when the tokens or the files change in a way the key does not see
CHUNK_PAIRS = 5_000  # pairs a worker tokenizes per task
SERIAL_BELOW = 20_000  # splits smaller than this are tokenized in this process (no pool start-up)
ENV_DIR = "S2S_JAX_DATA"
SIDES = ("src", "tgt")


def store_dir(cfg: DataConfig) -> str:
  """Where prepared corpora live: data.prepared_dir, $S2S_JAX_DATA, ~/.cache/s2s_jax/prepared."""
  return os.path.abspath(os.path.expanduser(
      cfg.prepared_dir or os.environ.get(ENV_DIR) or "~/.cache/s2s_jax/prepared"))


# ----------------------------------------------------------------------------- reading


def damaged(path: str, problem: str) -> DataError:
  """The error for a damaged file of a prepared corpus."""
  folder = os.path.dirname(path)
  return DataError(f"{path}: {problem}: the prepared corpus is damaged; delete {folder} and "
                   "rerun to prepare it again")


@dataclasses.dataclass
class SplitIds:
  """One split's store ids: sentence i of side s is ids[s][offsets[s][i]:offsets[s][i + 1]]."""
  ids: tuple[np.ndarray, np.ndarray]  # (src, tgt) uint32, memory-mapped
  offsets: tuple[np.ndarray, np.ndarray]  # (src, tgt) int64, n + 1 entries
  paths: tuple[str, str] = ("", "")  # (src, tgt) ids files, for messages

  def __len__(self) -> int:
    return len(self.offsets[0]) - 1

  def lengths(self, side: int) -> np.ndarray:
    lengths = np.diff(self.offsets[side])
    if len(lengths) and lengths.min() < 0:
      i = int(np.argmin(lengths))
      raise damaged(self.paths[side].removesuffix(".ids") + ".offsets.npy",
                    f"sentence {i + 1} ends before it starts")
    return lengths.astype(np.int32)

  def out_of_table(self, row: int, table_sizes: Sequence[int]) -> DataError:
    """The error for sentence `row` holding a store id beyond its side's token table."""
    side = next(k for k in (0, 1) if self.sentence(k, row).max(initial=0) >= table_sizes[k])
    return damaged(self.paths[side], f"sentence {row + 1} holds token id "
                   f"{int(self.sentence(side, row).max())}, beyond the {table_sizes[side]} "
                   "entries of the token table")

  def sentence(self, side: int, i: int) -> np.ndarray:
    off = self.offsets[side]
    return self.ids[side][off[i]:off[i + 1]]

  def gather(self, side: int, rows: np.ndarray,
             reverse: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of the sentences `rows`, concatenated, each reversed if `reverse`; their lengths;
    the position of each id within its sentence)."""
    off = self.offsets[side]
    rows = np.asarray(rows, np.int64)
    starts = off[rows]
    lengths = off[rows + 1] - starts
    firsts = np.cumsum(lengths) - lengths  # where each sentence starts among the gathered ids
    within = np.arange(int(lengths.sum())) - np.repeat(firsts, lengths)
    if reverse:
      positions = np.repeat(starts + lengths - 1, lengths) - within
    else:
      positions = np.repeat(starts, lengths) + within
    return self.ids[side][positions], lengths, within

  def dropped_counts(self, side: int, size: int, drop: np.ndarray) -> np.ndarray:
    """Token counts (by store id) over the sentences of rows `drop`."""
    return np.bincount(self.gather(side, drop)[0], minlength=size).astype(np.int64)


@dataclasses.dataclass
class Prepared:
  """A prepared corpus, opened: token tables (strings) and memory-mapped ids per split."""
  folder: str
  tables: tuple[list[str], list[str]]  # (src, tgt): token string by store id
  ranks: tuple[np.ndarray, np.ndarray]  # code point order rank of every table entry
  train_counts: tuple[np.ndarray, np.ndarray]  # token counts over the whole training split
  splits: dict[str, SplitIds]

  specials: tuple[dict[str, int], dict[str, int]]  # text tokens that spell a special -> store id

  def kept_counts(self, split: str, side: int, drop: np.ndarray) -> np.ndarray:
    """Token counts (by store id) over a split's sentences, less those of rows `drop`."""
    ids, size = self.splits[split], len(self.tables[side])
    if split == "train":
      counts = self.train_counts[side].copy()  # counted once, when the corpus was prepared
    else:
      counts = np.bincount(ids.ids[side], minlength=size).astype(np.int64)
      if len(counts) > size:
        raise damaged(ids.paths[side], f"token id {len(counts) - 1} is beyond the {size} "
                      "entries of the token table")
    if len(drop):
      counts -= ids.dropped_counts(side, size, drop)
    return counts

  def _by_frequency(self, side: int, counts: np.ndarray) -> np.ndarray:
    """Store ids of the tokens with counts > 0, most frequent first (ties: code point order)."""
    seen = np.flatnonzero(counts > 0)
    return seen[np.lexsort((self.ranks[side][seen], -counts[seen]))]

  def vocab(self, side: int, max_size: int, train_counts: np.ndarray) -> Vocab:
    """The `max_size` most frequent tokens by `train_counts` (the kept training pairs'), as
    Vocab.build gives on those pairs: spelled-out specials are unknown words, never kept."""
    counts = train_counts.copy()
    counts[list(self.specials[side].values())] = 0
    order = self._by_frequency(side, counts)[:max(max_size, 0)]
    return Vocab(list(SPECIALS) + [self.tables[side][i] for i in order])

  def word_ranks(self, side: int) -> dict[str, int]:
    """Frequency rank of every training token (1 = most frequent; ties: code point order)."""
    order = self._by_frequency(side, self.train_counts[side])
    return {self.tables[side][i]: r for r, i in enumerate(order.tolist(), 1)}

  def lookup(self, side: int, vocab: Vocab) -> np.ndarray:
    """uint32 map from store ids to `vocab` ids (unknown and spelled-out specials: <unk>)."""
    return np.fromiter((vocab.id_of(t) for t in self.tables[side]), np.uint32,
                       len(self.tables[side]))


def _load_table(path: str) -> list[str]:
  with open(path, encoding="utf-8", newline="") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return lines


def _map_ids(path: str, n: int) -> np.ndarray:
  """The file's uint32 ids, memory-mapped (as a plain ndarray view: cheaper to index)."""
  size = os.path.getsize(path)
  if size != 4 * n:
    raise damaged(path, f"{size} bytes, not the {4 * n} of {n} token ids")
  if n == 0:
    return np.zeros(0, np.uint32)
  return np.memmap(path, np.uint32, "r", shape=(n,)).view(np.ndarray)


def open_prepared(folder: str) -> Prepared:
  """Opens a complete prepared corpus (one whose meta.json exists); a DataError naming the
  file when one is missing, unreadable or does not fit the others."""
  meta_path = os.path.join(folder, "meta.json")
  meta = _read(meta_path, _load_json)
  try:
    tables = tuple(_read(p, _load_table) for p in _paths(folder, "tokens.{}.txt"))
    for path, table, side in zip(_paths(folder, "tokens.{}.txt"), tables, SIDES):
      if len(table) != meta[f"{side}_table"]:
        raise damaged(path, f"{len(table)} tokens, meta.json says {meta[f'{side}_table']}")
    ranks = tuple(_load_array(p, len(t)) for p, t in zip(_paths(folder, "rank.{}.npy"), tables))
    counts = tuple(_load_array(p, len(t)) for p, t in zip(_paths(folder, "counts.{}.npy"), tables))
    splits = {}
    for split, sizes in meta["splits"].items():
      paths = _paths(folder, f"{split}.{{}}.ids")
      offsets = tuple(_load_offsets(p.removesuffix(".ids") + ".offsets.npy", sizes["pairs"],
                                    sizes[f"{s}_tokens"]) for p, s in zip(paths, SIDES))
      ids = tuple(_read(p, lambda p, n=sizes[f"{s}_tokens"]: _map_ids(p, n))
                  for p, s in zip(paths, SIDES))
      splits[split] = SplitIds(ids, offsets, paths)
    specials = tuple(meta["specials"][s] for s in SIDES)
  except (KeyError, TypeError, AttributeError) as e:
    raise damaged(meta_path, f"malformed ({type(e).__name__}: {e})") from None
  return Prepared(folder, tables, ranks, counts, splits, specials)


def _read(path: str, read: Callable[[str], Any]) -> Any:
  """read(path); a `damaged` error naming the file when it cannot be read."""
  try:
    return read(path)
  except DataError:
    raise
  except (OSError, ValueError, EOFError) as e:
    raise damaged(path, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _load_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _paths(folder: str, pattern: str) -> tuple[str, str]:
  return tuple(os.path.join(folder, pattern.format(s)) for s in SIDES)


def _load_array(path: str, size: int) -> np.ndarray:
  """A .npy array of `size` entries (one per token of the table)."""
  array = _read(path, np.load)
  if array.shape != (size,):
    raise damaged(path, f"{array.shape[0] if array.ndim else 0} entries for {size} tokens")
  return array


def _load_offsets(path: str, pairs: int, tokens: int) -> np.ndarray:
  """A split's sentence offsets, memory-mapped: pairs + 1 of them, from 0 to `tokens`."""
  offsets = _read(path, lambda p: np.load(p, mmap_mode="r").view(np.ndarray))
  if offsets.shape != (pairs + 1,) or offsets[0] != 0 or offsets[-1] != tokens:
    raise damaged(path, f"offsets do not fit {pairs} sentences of {tokens} tokens")
  return offsets


# ----------------------------------------------------------------------------- the key


def tokenizer_identity(cfg: DataConfig, model_dir: str | None) -> str:
  """What decides the tokens: the tokenizer, the languages, the code of tokenize.py (and of
  moses.py and sacremoses' version for moses; the models' bytes for sentencepiece). Any edit
  of that code prepares the corpora again."""
  parts = [cfg.tokenizer, cfg.src_lang, cfg.tgt_lang, sources.code_hash(tokenize)]
  if cfg.tokenizer == "moses":
    import sacremoses
    parts += [getattr(sacremoses, "__version__", "?"), sources.code_hash(moses)]
  if cfg.tokenizer == "sentencepiece":
    for lang in (cfg.src_lang, cfg.tgt_lang):
      with open(tokenize.spm_model_path(model_dir, lang), "rb") as f:
        parts.append(hashlib.sha256(f.read()).hexdigest())
  return " ".join(parts)


def corpus_key(text_identity: str, tok_identity: str) -> str:
  h = hashlib.sha256(f"{FORMAT_VERSION}\n{text_identity}\n{tok_identity}".encode())
  return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- tokenizing

_worker_tokenizers: tuple[Callable, Callable] | None = None


def _init_worker(kind: str, src_lang: str, tgt_lang: str, model_dir: str | None) -> None:
  global _worker_tokenizers
  _worker_tokenizers = (tokenize.tokenizer(kind, src_lang, model_dir),
                        tokenize.tokenizer(kind, tgt_lang, model_dir))


def _encode_side(sentences: Sequence[list[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(local token table, uint32 local ids of all sentences, int64 lengths)."""
  index: dict[str, int] = {}
  ids = [index.setdefault(t, len(index)) for sent in sentences for t in sent]
  lengths = np.fromiter((len(s) for s in sentences), np.int64, len(sentences))
  return list(index), np.asarray(ids, np.uint32), lengths


def tokenize_chunk(chunk: sources.Chunk):
  """A worker's task: both sides of a chunk tokenized, as local tables and ids."""
  tok_src, tok_tgt = _worker_tokenizers
  return (_encode_side([tok_src(s) for s, _ in chunk]),
          _encode_side([tok_tgt(t) for _, t in chunk]))


def _in_order(pool, chunks: Iterator[sources.Chunk], window: int) -> Iterator:
  """pool.imap with at most `window` chunks in flight (imap would read the whole split)."""
  pending: collections.deque = collections.deque()
  for chunk in chunks:
    pending.append(pool.apply_async(tokenize_chunk, (chunk,)))
    if len(pending) >= window:
      yield pending.popleft().get()
  while pending:
    yield pending.popleft().get()


class _Table:
  """One side's token table, grown chunk by chunk, and its tokens' training-split counts."""

  def __init__(self):
    self.index: dict[str, int] = {}
    self.counts = np.zeros(1 << 16, np.int64)

  def store_ids(self, table: list[str], ids: np.ndarray, count: bool) -> np.ndarray:
    """Chunk-local ids (of the chunk's `table`) as store ids; `count`: add them to the counts."""
    index = self.index
    remap = np.fromiter((index.setdefault(t, len(index)) for t in table), np.uint32, len(table))
    if count:
      if len(index) > len(self.counts):  # grow by doubling: amortised O(1) a new token
        grown = np.zeros(max(len(index), 2 * len(self.counts)), np.int64)
        grown[:len(self.counts)] = self.counts
        self.counts = grown
      self.counts[remap] += np.bincount(ids, minlength=len(table))  # remap has no repeats
    return remap[ids]


class _SideWriter:
  """Appends a split's sentences, in store ids, to its file."""

  def __init__(self, path: str, table: _Table, count: bool):
    self.table, self.count = table, count
    self.file = open(path, "wb")
    self.lengths: list[np.ndarray] = []
    self.tokens = 0

  def add(self, table: list[str], ids: np.ndarray, lengths: np.ndarray) -> None:
    store = self.table.store_ids(table, ids, self.count)
    self.file.write(store.tobytes())
    self.lengths.append(lengths)
    self.tokens += len(store)

  def close(self) -> np.ndarray:
    self.file.close()
    lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _check_tokens(table: list[str], path: str) -> None:
  bad = [t for t in table if not t or "\n" in t]
  if bad:
    raise DataError(f"{path}: the tokenizer produced tokens a token table cannot hold: {bad[:3]!r}")


def _write_prepared(tmp: str, streams: dict[str, sources.Stream], cfg: DataConfig,
                    model_dir: str | None, workers: int, progress: bool) -> dict:
  tables = (_Table(), _Table())
  meta: dict = {"format": FORMAT_VERSION, "tokenizer": cfg.tokenizer, "splits": {},
                "specials": {}}
  total = sum(len(s) for s in streams.values())
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="pair", unit_scale=True, dynamic_ncols=True,
               desc="preparing corpus")
  pool = None
  init = (cfg.tokenizer, cfg.src_lang, cfg.tgt_lang, model_dir)
  try:
    if workers > 1 and total >= SERIAL_BELOW:
      pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init)
      run = lambda chunks: _in_order(pool, chunks, 3 * workers)
    else:
      _init_worker(*init)
      run = lambda chunks: map(tokenize_chunk, chunks)
    for split, stream in streams.items():
      writers = [_SideWriter(os.path.join(tmp, f"{split}.{s}.ids"), tables[k], split == "train")
                 for k, s in enumerate(SIDES)]
      for result in run(stream.chunks(CHUNK_PAIRS)):
        for writer, (table, ids, lengths) in zip(writers, result):
          writer.add(table, ids, lengths)
        if bar is not None:
          bar.update(len(result[0][2]))
      sizes = {}
      for k, s in enumerate(SIDES):
        offsets = writers[k].close()
        np.save(os.path.join(tmp, f"{split}.{s}.offsets.npy"), offsets)
        sizes[f"{s}_tokens"] = writers[k].tokens
      sizes["pairs"] = len(offsets) - 1
      meta["splits"][split] = sizes
  finally:
    if pool is not None:
      pool.terminate()
    if bar is not None:
      bar.close()
  for k, s in enumerate(SIDES):
    index = tables[k].index
    table = list(index)
    path = os.path.join(tmp, f"tokens.{s}.txt")
    _check_tokens(table, path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write("".join(t + "\n" for t in table))
    rank = np.empty(len(table), np.uint32)
    rank[sorted(range(len(table)), key=table.__getitem__)] = np.arange(len(table), dtype=np.uint32)
    np.save(os.path.join(tmp, f"rank.{s}.npy"), rank)
    counts = np.zeros(len(table), np.int64)
    n = min(len(table), len(tables[k].counts))
    counts[:n] = tables[k].counts[:n]
    np.save(os.path.join(tmp, f"counts.{s}.npy"), counts)
    meta[f"{s}_table"] = len(table)
    meta["specials"][s] = {t: index[t] for t in SPECIALS if t in index}
  return meta


def _incomplete_name(folder: str) -> str:
  return f"{folder}.incomplete-{socket.gethostname()}-{os.getpid()}"


def _remove_stale(folder: str) -> None:
  """Removes this host's incomplete preparations of `folder` whose process is gone."""
  parent, name = os.path.split(folder)
  prefix = f"{name}.incomplete-{socket.gethostname()}-"
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    try:
      os.kill(int(entry[len(prefix):]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except (ValueError, PermissionError, OSError):
      pass


def default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def prepare(cfg: DataConfig, streams: dict[str, sources.Stream], text_identity: str,
            model_dir: str | None, progress: bool = False) -> Prepared:
  """Opens the prepared corpus of these streams and tokenizer, preparing it first if needed."""
  root = store_dir(cfg)
  key = corpus_key(text_identity, tokenizer_identity(cfg, model_dir))
  folder = os.path.join(root, f"{cfg.source}-{key}")
  if os.path.exists(os.path.join(folder, "meta.json")):
    t0 = time.perf_counter()
    prepared = open_prepared(folder)
    logging.info("data: prepared corpus %s opened in %.2f s", folder, time.perf_counter() - t0)
    return prepared
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise DataError(f"{root}: cannot create the data store ({e.strerror}); set "
                    f"--data.prepared_dir or ${ENV_DIR} to a writable folder") from None
  _remove_stale(folder)
  tmp = _incomplete_name(folder)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  workers = cfg.workers if cfg.workers > 0 else default_workers()
  t0 = time.perf_counter()
  try:
    meta = _write_prepared(tmp, streams, cfg, model_dir, workers, progress)
    meta["text"], meta["seconds"] = text_identity[:500], round(time.perf_counter() - t0, 3)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process finished the same corpus first: use that one
      if not os.path.exists(os.path.join(folder, "meta.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  pairs = sum(s["pairs"] for s in meta["splits"].values())
  dt = time.perf_counter() - t0
  logging.info("data: prepared %d pairs (%s) in %.1f s, %.0f pairs/s with %d worker(s), into %s",
               pairs, cfg.tokenizer, dt, pairs / max(dt, 1e-9),
               workers if pairs >= SERIAL_BELOW else 1, folder)
  return open_prepared(folder)


def sample_text(stream: sources.Stream, side: int, limit: int) -> Iterator[str]:
  """At most about `limit` sentences of one side of a split, evenly spread over it."""
  stride = max(1, -(-len(stream) // max(limit, 1)))
  i = 0
  for chunk in stream.chunks(CHUNK_PAIRS):
    for pair in chunk:
      if i % stride == 0:
        yield pair[side]
      i += 1
