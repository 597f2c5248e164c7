"""Official test sets by name (`python -m s2s_jax.evaluate --testset wmt14/full`), through
sacreBLEU's own downloader and cache.

Any sacreBLEU test set with the model's language pair (data.src_lang-data.tgt_lang) can be
named. sacreBLEU keeps each one in its cache, `$SACREBLEU` (else ~/.sacrebleu), under
`<name>/raw/`: the downloaded archive `<name with / as _>.<archive name>`, unpacked in that
folder, from which it writes one plain text file per field. A test set that is not there is
downloaded once, if its host answers a quick probe (`net.unreachable`); otherwise `load` stops
at once with a one-line error saying where to place which files.
"""

from __future__ import annotations

import difflib
import logging
import os

from s2s_jax.data import net
from s2s_jax.data.sources import DataError, first_line, read_lines

ARCHIVES = (".tgz", ".tar.gz", ".zip")  # what sacreBLEU unpacks after a download


def _dataset(name: str):
  from sacrebleu.dataset import DATASETS
  if name not in DATASETS:
    close = difflib.get_close_matches(name, list(DATASETS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise DataError(f"--testset {name}: no such sacreBLEU test set{hint} "
                    "(python -m sacrebleu --list names them all)")
  return DATASETS[name]


def _archives(dataset) -> list[tuple[str, str]]:
  """[(URL, path in the cache)] of the files sacreBLEU downloads for a test set."""
  return [(url, os.path.join(dataset._rawdir, dataset._get_tarball_filename(url)))
          for url in dataset.data]


def _needs_download(dataset, pair: str) -> bool:
  """Whether sacreBLEU would download: a field's text file is missing and so is an archive."""
  texts = [dataset._get_txt_file_path(pair, field) for field in dataset.fieldnames(pair)]
  if all(os.path.exists(path) for path in texts):
    return False
  return not all(os.path.isfile(p) and os.path.getsize(p) > 0 for _, p in _archives(dataset))


def _how_to_place(name: str, dataset, pair: str, why: str) -> str:
  archives = _archives(dataset)
  steps = "download " + ", ".join(f"{url} to {path}" for url, path in archives)
  unpack = [os.path.basename(p) for _, p in archives if p.endswith(ARCHIVES)]
  if unpack:
    steps += f" and unpack {', '.join(unpack)} there"
  holds = " and ".join(dataset.langpairs[pair])
  return (f"sacreBLEU test set {name} ({pair}) is not in sacreBLEU's cache and cannot be "
          f"downloaded from here ({why}): {steps}, so that {dataset._rawdir} holds {holds}; "
          "or point SACREBLEU=DIR at a cache that has it")


def load(name: str, src_lang: str, tgt_lang: str) -> tuple[list[tuple[str, str]], str]:
  """([(source, reference)], a name for results files) of sacreBLEU test set `name` in the
  language pair src_lang-tgt_lang (the first reference where there are several)."""
  dataset = _dataset(name)
  pair = f"{src_lang}-{tgt_lang}"
  if pair not in dataset.langpairs:
    pairs = ", ".join(sorted(p for p in dataset.langpairs if "-" in p))
    raise DataError(f"--testset {name} has no {pair} (the model's data.src_lang-data.tgt_lang); "
                    f"its language pairs: {pairs}")
  if _needs_download(dataset, pair):
    why = net.unreachable(dataset.data)
    if why:
      raise DataError(_how_to_place(name, dataset, pair, why))
    logging.info("downloading sacreBLEU test set %s into %s", name, dataset._rawdir)
  from sacrebleu import utils
  try:  # downloads (once) and converts to plain text where needed
    src_path = utils.get_source_file(name, pair)
    ref_paths = utils.get_reference_files(name, pair)
  except (OSError, SystemExit) as e:  # HTTP/file errors; sacreBLEU exits on a bad checksum
    why = first_line(e) if isinstance(e, OSError) else "see sacreBLEU's message above"
    raise DataError(f"sacreBLEU could not fetch {name} ({pair}) into {dataset._rawdir}: "
                    f"{why}") from None
  if len(ref_paths) > 1:
    logging.info("%s (%s) has %d references: scoring against the first, %s", name, pair,
                 len(ref_paths), ref_paths[0])
  src, ref = read_lines(src_path), read_lines(ref_paths[0])
  if len(src) != len(ref):
    raise DataError(f"{src_path} has {len(src)} lines but {ref_paths[0]} has {len(ref)}: "
                    "remove sacreBLEU's cached text files to have them written again")
  return list(zip(src, ref)), f"{name}.{pair}"

