"""Where sentence pairs come from: the splits train, valid and test of raw text (surrounding
whitespace stripped, nothing else changed), as streams read chunk by chunk (`open_streams`, for
preparing a corpus) or one split as a list (`read_split`, for evaluating it).

- synthetic: the embedded English->French grammar corpus (`s2s_jax.data.synthetic`).
- text: a folder with {train,valid,test}.{src_lang,tgt_lang}, UTF-8, one sentence a line.
- tfds: a TFDS translation dataset (default wmt14_translate/fr-en), read without TensorFlow
  from data prepared in the array_record format under data.tfds_data_dir. Data that is not
  there is prepared first, by one process while the others wait: from the archives in
  data.tfds_manual_dir when given, else downloaded by TFDS itself when data.download is on and
  the download hosts answer a quick probe (`net.unreachable`). Otherwise the run stops at once
  with a `DataError` that says what to fetch and where to put it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import tarfile
import zipfile
import zlib
from typing import Any, Iterator, Sequence

from s2s_jax.config import DataConfig
from s2s_jax.data import net, synthetic
from s2s_jax.parallel import devices

SPLITS = ("train", "valid", "test")
TFDS_SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # ours -> TFDS names
TFDS_READ_CHUNK = 10_000  # records fetched per __getitems__ call


class DataError(ValueError):
  """A corpus that cannot be read; the one-line message names the file and what to do."""


def read_split(cfg: DataConfig, split: str) -> list[tuple[str, str]]:
  """The raw (source, target) pairs of one split, reading nothing of the others: only that
  split's files or TFDS records; for synthetic, only the generator's stream up to that split
  (the test split comes first)."""
  if split not in SPLITS:
    raise DataError(f"no split {split!r} in the configured corpus; splits: {', '.join(SPLITS)}")
  if cfg.source == "synthetic":
    return synthetic.make_split(split, cfg.synthetic_train, cfg.synthetic_valid,
                                cfg.synthetic_test, seed=cfg.synthetic_seed)
  if cfg.source == "text":
    return read_text_pair(_text_folder(cfg.path, cfg.src_lang, cfg.tgt_lang), split,
                          cfg.src_lang, cfg.tgt_lang)
  if cfg.source == "tfds":
    _, records = _tfds_records(cfg, (split,))
    return [pair for chunk in _tfds_chunks(cfg, records[split], split, TFDS_READ_CHUNK)
            for pair in chunk]
  raise DataError(f"data.source must be synthetic, text or tfds, got {cfg.source!r}")


# ----------------------------------------------------------------------------- streaming

Chunk = list[tuple[str, str]]


class Stream:
  """One split of a corpus, read chunk by chunk: `len(stream)` pairs, `chunks(n)` yields lists
  of at most n (source, target) pairs in corpus order, never the whole split at once."""

  def __init__(self, size: int, chunks):
    self.size, self._chunks = size, chunks

  def __len__(self) -> int:
    return self.size

  def chunks(self, n: int) -> Iterator[Chunk]:
    return self._chunks(n)


def _list_stream(pairs: Sequence[tuple[str, str]]) -> Stream:
  return Stream(len(pairs), lambda n: (list(pairs[i:i + n]) for i in range(0, len(pairs), n)))


def code_hash(module: Any) -> str:
  """sha256 of a module's source file: part of the identity of what its code produces."""
  with open(module.__file__, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def open_streams(cfg: DataConfig, store: str | None = None) -> tuple[dict[str, Stream], str]:
  """({split: Stream}, identity): the splits as streams, and a string that changes whenever
  the text could (file contents for text, builder version and sizes for tfds, generator
  settings and code for synthetic). Text files are read once to count and hash their lines;
  with a data `store`, the result is kept there for as long as the file's size, modification
  and change times and inode stay the same."""
  if cfg.source == "synthetic":
    ident = (f"synthetic {cfg.synthetic_train} {cfg.synthetic_valid} {cfg.synthetic_test} "
             f"{cfg.synthetic_seed} {code_hash(synthetic)}")
    splits = synthetic.make_splits(cfg.synthetic_train, cfg.synthetic_valid, cfg.synthetic_test,
                                   seed=cfg.synthetic_seed)
    return {s: _list_stream(splits[s]) for s in SPLITS}, ident
  if cfg.source == "text":
    folder = _text_folder(cfg.path, cfg.src_lang, cfg.tgt_lang)
    streams, parts, hashes = {}, ["text"], _HashCache(store)
    for split in SPLITS:
      src_path, tgt_path = _text_paths(folder, split, cfg.src_lang, cfg.tgt_lang)
      (n_src, h_src), (n_tgt, h_tgt) = (hashes.count_and_hash(p) for p in (src_path, tgt_path))
      if n_src != n_tgt:
        raise DataError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}: "
                        "a parallel corpus needs one target line per source line")
      parts += [split, h_src, h_tgt]
      streams[split] = Stream(n_src, lambda n, a=src_path, b=tgt_path: _text_chunks(a, b, n))
    hashes.save()
    return streams, " ".join(parts)
  if cfg.source == "tfds":
    return _tfds_streams(cfg)
  raise DataError(f"data.source must be synthetic, text or tfds, got {cfg.source!r}")


# ----------------------------------------------------------------------------- text files


def read_lines(path: str) -> list[str]:
  """The stripped lines of a UTF-8 file (a leading byte-order mark is dropped)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  with open(path, "rb") as f:
    return [_decode_line(raw, path, number) for number, raw in enumerate(f, 1)]


def _languages_in(folder: str) -> list[str]:
  return sorted({name.split(".", 1)[1] for name in os.listdir(folder)
                 if "." in name and name.split(".", 1)[0] in SPLITS})


def _text_paths(folder: str, split: str, src_lang: str, tgt_lang: str) -> tuple[str, str]:
  src_path = os.path.join(folder, f"{split}.{src_lang}")
  tgt_path = os.path.join(folder, f"{split}.{tgt_lang}")
  for path in (src_path, tgt_path):
    if not os.path.isfile(path):
      found = ", ".join(_languages_in(folder)) or "none"
      raise DataError(f"{path}: file not found; data.source=text reads {{train,valid,test}}."
                      f"{{{src_lang},{tgt_lang}}} from {folder} (languages found there: {found})")
  return src_path, tgt_path


def _count_and_hash(path: str, block: int = 1 << 24) -> tuple[int, str]:
  """(number of lines, sha256 of the bytes) of a file, read in blocks."""
  h, lines, last = hashlib.sha256(), 0, b"\n"
  with open(path, "rb") as f:
    while data := f.read(block):
      h.update(data)
      lines += data.count(b"\n")
      last = data[-1:]
  return lines + (last != b"\n"), h.hexdigest()


HASHES_FILE = "text-hashes.json"  # in the data store: {path: [stat key, lines, sha256]}


def _stat_key(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class _HashCache:
  """`_count_and_hash` results kept in the data store's HASHES_FILE, for files whose
  `_stat_key` has not changed since; read once, written once (`save`) if anything was added."""

  def __init__(self, store: str | None):
    self.path = os.path.join(store, HASHES_FILE) if store else None
    self.known, self.added = {}, False
    if self.path:
      try:
        with open(self.path, encoding="utf-8") as f:
          self.known = json.load(f)
      except (OSError, ValueError):  # none yet, or unreadable: hash again and rewrite it
        pass
      if not isinstance(self.known, dict):
        self.known = {}

  def count_and_hash(self, path: str) -> tuple[int, str]:
    if not self.path:
      return _count_and_hash(path)
    path = os.path.realpath(path)
    key, entry = _stat_key(path), self.known.get(path)
    if isinstance(entry, list) and len(entry) == 3 and entry[0] == key:
      return int(entry[1]), str(entry[2])
    lines, digest = _count_and_hash(path)
    if _stat_key(path) == key:  # not changed while it was read: keep it
      self.known[path], self.added = [key, lines, digest], True
    return lines, digest

  def save(self) -> None:
    if not self.added:
      return
    try:  # another host or run may write it too: each write is whole, the last one wins
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      tmp = f"{self.path}.tmp-{socket.gethostname()}-{os.getpid()}"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(self.known, f)
      os.replace(tmp, self.path)
    except OSError:  # a read-only store still works; the files are hashed every time
      pass


def _decode_line(raw: bytes, path: str, number: int) -> str:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: line {number}: invalid UTF-8 ({e.reason} at byte {e.start + 1} of "
                    "the line); convert the file to UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)") from None
  return (text.removeprefix("\ufeff") if number == 1 else text).strip()


def _text_chunks(src_path: str, tgt_path: str, n: int) -> Iterator[Chunk]:
  """The pairs of two line-aligned files (counted equal by `open_streams`), n at a time."""
  with open(src_path, "rb") as fs, open(tgt_path, "rb") as ft:
    chunk: Chunk = []
    for number, (a, b) in enumerate(zip(fs, ft), 1):
      chunk.append((_decode_line(a, src_path, number), _decode_line(b, tgt_path, number)))
      if len(chunk) == n:
        yield chunk
        chunk = []
    if chunk:
      yield chunk


def _text_folder(folder: str, src_lang: str, tgt_lang: str) -> str:
  if not folder:
    raise DataError("data.source=text needs --data.path=DIR, a folder with "
                    f"{{train,valid,test}}.{{{src_lang},{tgt_lang}}}")
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: folder not found (data.path)")
  return folder


def read_text_pair(folder: str, split: str, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
  src_path, tgt_path = _text_paths(folder, split, src_lang, tgt_lang)
  src, tgt = read_lines(src_path), read_lines(tgt_path)
  if len(src) != len(tgt):
    raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                    "a parallel corpus needs one target line per source line")
  return list(zip(src, tgt))


# ----------------------------------------------------------------------------- TFDS


def first_line(e: BaseException) -> str:
  """An exception as one line (TFDS messages can run to hundreds of lines)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
    import tensorflow_datasets.translate  # noqa: F401  (registers the wmt*_translate builders)
  except ImportError as e:
    raise DataError(f"data.source=tfds needs tensorflow-datasets ({e}); "
                    "pip install tensorflow-datasets") from None
  return tfds


def tfds_builder(cfg: DataConfig):
  """The TFDS builder of `cfg.tfds_name` under `cfg.tfds_data_dir` (nothing is downloaded)."""
  tfds = _import_tfds()
  try:
    return tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir or None)
  except Exception as e:  # DatasetNotFoundError, bad config name, ...: report, never traceback
    raise DataError(f"data.tfds_name={cfg.tfds_name!r}: {first_line(e)}") from None


def tfds_download_files(builder) -> dict[str, str]:
  """{file name: URL} of the archives a WMT builder reads for its language pair ({} if unknown)."""
  try:
    from tensorflow_datasets.translate import wmt
  except ImportError:
    return {}
  if not isinstance(builder, wmt.WmtTranslate):
    return {}
  source = builder.builder_config.language_pair[0]
  files = {}
  for names in builder.subsets.values():
    for name in names:
      ds = wmt.DATASET_MAP[name]
      urls = ds.get_url(source)
      urls = [urls] if isinstance(urls, str) else list(urls)
      manual = ds.get_manual_dl_files(source)
      for fname in manual:
        files[fname] = " ".join(urls)
      if not manual:
        for url in urls:
          files[url.rsplit("/", 1)[-1]] = url
  return files


def _not_prepared(cfg: DataConfig, builder, why: str) -> DataError:
  files = tfds_download_files(builder)
  fetch = (f"download {', '.join(files.values())} into a folder and pass "
           "--data.tfds_manual_dir=FOLDER" if files else
           "prepare it with --data.download=true where the network is reachable and pass "
           "--data.tfds_data_dir=DIR")
  return DataError(f"TFDS dataset {cfg.tfds_name} is not prepared in {builder.data_dir} and "
                   f"{why}: {fetch}; or use --data.source=text with your own files "
                   "(see docs/data.md)")


def _download_urls(builder) -> list[str]:
  """The URLs a builder downloads from (the WMT archives, else its registered checksums')."""
  urls = [u for value in tfds_download_files(builder).values() for u in value.split()]
  return urls or sorted(builder.url_infos or {})


def registered_url_infos(builder) -> dict:
  """{URL: checksums.UrlInfo} that TFDS knows for any dataset, then this builder's own."""
  from tensorflow_datasets.core.download import checksums
  return {**checksums.get_all_url_infos(), **(builder.url_infos or {})}


def _manual_url_infos(builder, manual: str, files: dict[str, str]) -> dict:
  """URL infos under which TFDS finds every file of `files` in `manual` (no download).

  TFDS looks a URL's file up in the manual dir by the file name registered with its checksum;
  WMT'14 fr-en reads two archives that only other WMT years register (UN, Giga-FrEn), and an
  unregistered URL would be downloaded. Registered checksums are kept (TFDS checks the user's
  files against them); an archive nobody registered is described from the file itself.
  """
  from tensorflow_datasets.core.download import checksums
  known = registered_url_infos(builder)
  infos = dict(builder.url_infos or {})
  for fname, url in files.items():
    if " " in url or not url.startswith(("http://", "https://")):
      continue  # a file TFDS itself asks to be downloaded by hand: read from manual_dir directly
    info = known.get(url) or checksums.compute_url_info(os.path.join(manual, fname))
    infos[url] = checksums.UrlInfo(size=info.size, checksum=info.checksum, filename=fname)
  return infos


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def unpack_archive(path: str, method, target: str) -> None:
  """Unpacks `path` (TFDS ExtractMethod `method`) into the folder `target` (for a single
  compressed file, GZIP or BZIP2, into the file `target`) with Python's tarfile (`untar`),
  zipfile, gzip and bz2, through a temporary name; a DataError if the archive is damaged."""
  from tensorflow_datasets.core.download import resource as resource_lib
  kind = resource_lib.ExtractMethod
  tmp = target + ".incomplete"
  _remove(tmp)
  try:
    if method == kind.ZIP:
      with zipfile.ZipFile(path) as z:
        z.extractall(tmp)
    elif method in (kind.GZIP, kind.BZIP2):
      opener = gzip.open if method == kind.GZIP else bz2.open
      with opener(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    else:  # TAR, TAR_GZ, TAR_STREAM, TAR_GZ_STREAM
      untar(path, tmp)
  except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
    _remove(tmp)
    raise unpack_error(path, e) from None
  _remove(target)
  os.replace(tmp, target)


def untar(path: str, folder: str) -> None:
  """Unpacks the tar archive `path` (any compression) into `folder`, with tarfile's
  path-traversal-safe "data" filter (Python 3.11.4+)."""
  os.makedirs(folder, exist_ok=True)
  with tarfile.open(path) as t:
    t.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def unpack_error(path: str, e: BaseException) -> DataError:
  why = " ".join(str(e).split())
  return DataError(f"{path}: cannot unpack ({why}); is the download complete?")


def extract_archives(manual: str, names: Sequence[str], extract_dir: str) -> None:
  """Unpacks the tar/zip archives `names` of `manual` where TFDS looks for earlier extractions.

  TFDS would extract them itself, but through tf.io.gfile (TensorFlow). It reuses an
  existing `<extract_dir>/<METHOD>.<file name>` instead, so `unpack_archive` does it here,
  again whenever the archive has changed since.
  """
  from tensorflow_datasets.core.download import resource as resource_lib
  kinds = {resource_lib.ExtractMethod.TAR, resource_lib.ExtractMethod.TAR_GZ,
           resource_lib.ExtractMethod.ZIP}
  for name in names:
    method = resource_lib.guess_extract_method(name)
    if method not in kinds:
      continue
    target = os.path.join(extract_dir, f"{method.name}.{name}")
    path = os.path.join(manual, name)
    st = os.stat(path)
    stamp = f"{st.st_size} {st.st_mtime_ns}\n"  # which archive the extraction came from
    if os.path.exists(target) and _read_text(target + ".from") == stamp:
      continue
    unpack_archive(path, method, target)
    with open(target + ".from", "w") as f:
      f.write(stamp)


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


class _Extractor:
  """Stands in for TFDS's extractor (which writes through tf.io.gfile): `unpack_archive`."""

  @contextlib.contextmanager
  def tqdm(self):
    yield

  def extract(self, path, method, to_path):
    import promise
    unpack_archive(os.fspath(path), method, os.fspath(to_path))
    return promise.Promise.resolve(to_path)


@contextlib.contextmanager
def _patched(obj, name: str, value):
  """obj.name = value for the duration (restored, or deleted if obj had no own value)."""
  missing = object()
  own = vars(obj).get(name, missing)
  setattr(obj, name, value)
  try:
    yield
  finally:
    if own is missing:
      delattr(obj, name)
    else:
      setattr(obj, name, own)


def _run_download_and_prepare(builder, config, what: str, url_infos: dict | None = None) -> None:
  """builder.download_and_prepare in the array_record format (read without TensorFlow), with
  archives unpacked without TensorFlow and `url_infos`, if given, as the builder's checksums;
  a failure is a one-line DataError that starts with `what`."""
  from tensorflow_datasets.core.download import extractor
  try:
    with contextlib.ExitStack() as stack:
      stack.enter_context(_patched(extractor, "get_extractor", lambda *a, **k: _Extractor()))
      if url_infos is not None:
        stack.enter_context(_patched(type(builder), "url_infos", url_infos))
      builder.download_and_prepare(download_config=config, file_format="array_record")
  except DataError:
    raise
  except Exception as e:  # checksum mismatch, corrupt archive, missing module, HTTP error, ...
    first = first_line(e)
    hint = ""
    if "importlib_resources" in first:
      hint = " (pip install importlib_resources: tensorflow-datasets needs it, undeclared)"
    elif "checksum" in first:
      hint = " (not the file TFDS registered: an incomplete download, or another version)"
    raise DataError(f"{what} failed: {type(e).__name__}: {first}{hint}") from None


def prepare_from_manual_dir(cfg: DataConfig, builder) -> None:
  """Builds the TFDS dataset (array_record) from archives in `cfg.tfds_manual_dir`, offline."""
  tfds = _import_tfds()
  manual = cfg.tfds_manual_dir
  if not os.path.isdir(manual):
    raise DataError(f"{manual}: folder not found (data.tfds_manual_dir)")
  files = tfds_download_files(builder)
  missing = [f"{name} ({url})" for name, url in files.items()
             if not os.path.exists(os.path.join(manual, name))]
  if missing:
    raise DataError(f"{manual}: {len(missing)} of the {len(files)} files {cfg.tfds_name} is built "
                    f"from are missing (nothing is downloaded): {', '.join(missing)}")
  extract_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads", "extracted")
  extract_archives(manual, list(files), extract_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual, extract_dir=extract_dir,
                                        try_download_gcs=False)
  _run_download_and_prepare(builder, config, f"preparing {cfg.tfds_name} from {manual}",
                            _manual_url_infos(builder, manual, files))


def download_and_prepare(cfg: DataConfig, builder) -> None:
  """Downloads the TFDS dataset with TFDS's own downloader (progress bars on stderr; archives
  checked against the checksums TFDS registered for any dataset) into `<data dir>/downloads`,
  and prepares it (array_record), if the download hosts answer; otherwise the DataError that
  says what to fetch by hand, at once."""
  urls = _download_urls(builder)
  why = net.unreachable(urls)
  if why:
    raise _not_prepared(cfg, builder, f"cannot be downloaded from here ({why})")
  tfds = _import_tfds()
  from tensorflow_datasets.core import units
  known = registered_url_infos(builder)
  sizes = [int(known[u].size) for u in urls if u in known]
  size = (f"{units.Size(sum(sizes))}{'' if len(sizes) == len(urls) else ' and more'}"
          if sizes else "size unknown")
  logging.info("TFDS dataset %s is not prepared: downloading %d files (%s) into %s, then "
               "preparing it in %s", cfg.tfds_name, len(urls), size,
               os.path.join(os.fspath(builder.data_dir_root), "downloads"), builder.data_dir)
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  _run_download_and_prepare(builder, config,
                            f"downloading and preparing {cfg.tfds_name} in {builder.data_dir}")


def _prepared_builder(cfg: DataConfig):
  """The builder of a prepared dataset: prepared first (manual dir, else download) if need be."""
  builder = tfds_builder(cfg)
  if builder.is_prepared():
    return builder
  if cfg.tfds_manual_dir:
    prepare_from_manual_dir(cfg, builder)
  elif not cfg.download:
    raise _not_prepared(cfg, builder, "data.download=false")
  else:
    download_and_prepare(cfg, builder)
  return builder




def _split_records(cfg: DataConfig, builder, split: str) -> Sequence:
  """The records of one TFDS split (array_record: read without TensorFlow), or a DataError
  saying what is missing."""
  try:
    source = builder.as_data_source(split=split)
    len(source)
    return source
  except NotImplementedError:
    pass
  except Exception as e:  # missing files, unknown split, ...
    raise DataError(f"{builder.data_dir}: cannot read split {split!r} of {cfg.tfds_name}: "
                    f"{first_line(e)}") from None
  # Prepared in a format without random access (tfrecord): only TensorFlow reads that.
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise DataError(f"{builder.data_dir}: {cfg.tfds_name} was prepared as "
                    f"{builder.info.file_format.value}, which only TensorFlow can read: "
                    "pip install tensorflow-cpu, or prepare it again with "
                    "file_format='array_record' (what --data.tfds_manual_dir does)") from None
  import tensorflow_datasets as tfds
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _text(value: Any, where: str) -> str:
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
  return str(value).strip()


def _fetch(records: Sequence, keys: list[int]) -> Sequence:
  """records[keys]: one batched read (5x faster on array_record) where the source has one."""
  getitems = getattr(records, "__getitems__", None)
  if getitems is not None:
    try:
      return getitems(keys)
    except TypeError:  # a source whose batched read is broken (tfds.testing.mock_data's)
      pass
  return [records[k] for k in keys]


def _tfds_records(cfg: DataConfig,
                  wanted: Sequence[str] = SPLITS) -> tuple[Any, dict[str, Sequence]]:
  """(builder, {our split: records}) of the `wanted` splits of a prepared TFDS dataset
  (prepared first if need be, by process 0 while the others wait; every process calls this)."""
  builder = devices.main_process_first(lambda: _prepared_builder(cfg))
  languages = list(getattr(builder.info.features, "languages", []) or [])
  for lang in (cfg.src_lang, cfg.tgt_lang):
    if languages and lang not in languages:
      raise DataError(f"TFDS dataset {cfg.tfds_name} has the languages {', '.join(languages)}, "
                      f"not {lang!r} (data.src_lang / data.tgt_lang)")
  splits = list(builder.info.splits)
  records = {}
  for ours in wanted:
    theirs = TFDS_SPLITS[ours]
    if splits and theirs not in splits:
      raise DataError(f"{builder.data_dir}: {cfg.tfds_name} has the splits {', '.join(splits)}, "
                      f"not {theirs!r} (used as {ours})")
    records[ours] = _split_records(cfg, builder, theirs)
  return builder, records


def _tfds_chunks(cfg: DataConfig, records: Sequence, split: str, n: int) -> Iterator[Chunk]:
  theirs = TFDS_SPLITS[split]
  for start in range(0, len(records), n):
    keys = list(range(start, min(start + n, len(records))))
    chunk = []
    for k, ex in zip(keys, _fetch(records, keys)):
      where = f"{cfg.tfds_name} split {theirs} record {k}"
      chunk.append((_text(ex[cfg.src_lang], where), _text(ex[cfg.tgt_lang], where)))
    yield chunk


def _tfds_streams(cfg: DataConfig) -> tuple[dict[str, Stream], str]:
  builder, records = _tfds_records(cfg)
  sizes = " ".join(f"{s}={len(r)}" for s, r in records.items())
  ident = f"tfds {cfg.tfds_name} {builder.version} {cfg.src_lang}-{cfg.tgt_lang} {sizes}"
  streams = {s: Stream(len(r), lambda n, s=s, r=r: _tfds_chunks(cfg, r, s, n))
             for s, r in records.items()}
  return streams, ident
