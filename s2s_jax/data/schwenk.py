"""The paper's corpus as a text-source folder: Schwenk's WMT'14 English-French selection.

    python -m s2s_jax.data.schwenk --src DOWNLOAD_DIR --out DIR

DOWNLOAD_DIR holds the two archives of http://www-lium.univ-lemans.fr/~schwenk/cslm_joint_paper/
as downloaded (`bitexts.tgz`, `dev+test.tgz`), or what they unpack to:
- `bitexts.selected/<corpus>.{en,fr}.gz`: the 12M selected training pairs, one gzip file per
  corpus and language (ep7_pc45, nc9, dev08_11, crawl, ccb2_pc30, un2000_pc34), tokenized;
- `dev/ntst1213.{en,fr}` (newstest2012 + newstest2013) and `dev/ntst14.{en,fr}` (newstest2014).

DIR then holds train.{en,fr} (the corpora concatenated in name order, line counts checked),
valid.{en,fr} (ntst1213) and test.{en,fr} (ntst14), for --data.source=text --data.path=DIR
--data.tokenizer=none. Archives are unpacked into a temporary folder inside DIR, removed after.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from typing import Sequence

from s2s_jax import cli
from s2s_jax.data import sources
from s2s_jax.data.sources import DataError

URL = "http://www-lium.univ-lemans.fr/~schwenk/cslm_joint_paper/data/"
ARCHIVES = {"bitexts.tgz": "bitexts.selected", "dev+test.tgz": "dev"}  # archive -> its folder
SPLITS = {"valid": "ntst1213", "test": "ntst14"}  # our split -> the file stem in dev/
LANGS = ("en", "fr")
_NAME = re.compile(r"(.+)\.(en|fr)(\.gz)?")


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _files(folder: str) -> dict[str, dict[str, str]]:
  """{stem: {lang: path}} of the `<stem>.{en,fr}[.gz]` files in a folder, stems in name order."""
  found: dict[str, dict[str, str]] = {}
  for name in sorted(os.listdir(folder)):
    m = _NAME.fullmatch(name)
    if m:
      found.setdefault(m.group(1), {})[m.group(2)] = os.path.join(folder, name)
  return found


def _sides(files: dict[str, dict[str, str]], stems: Sequence[str]) -> dict[str, list[str]]:
  """{lang: [path of each stem]}; a DataError if a stem lacks a side."""
  for stem in stems:
    for lang in LANGS:
      if lang not in files[stem]:
        (other,) = files[stem].values()
        raise DataError(f"{other}: corpus {stem} has no .{lang} side next to it")
  return {lang: [files[stem][lang] for stem in stems] for lang in LANGS}


def _copy(paths: Sequence[str], out: str) -> list[int]:
  """Writes the lines of `paths` one after the other to `out` (through a temporary name, each
  file ending with a newline); returns each file's number of lines."""
  counts = []
  with open(out + ".tmp", "wb") as dst:
    for path in paths:
      lines, last = 0, b"\n"
      try:
        with _open(path) as src:
          while block := src.read(1 << 24):
            dst.write(block)
            lines += block.count(b"\n")
            last = block[-1:]
      except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); is the download complete?") from None
      if last != b"\n":
        dst.write(b"\n")
        lines += 1
      counts.append(lines)
  os.replace(out + ".tmp", out)
  return counts


def _write_pair(sides: dict[str, list[str]], out_dir: str, split: str,
                names: Sequence[str]) -> int:
  """split.{en,fr} from the files of each side; the two sides must match file by file."""
  counts = {lang: _copy(sides[lang], os.path.join(out_dir, f"{split}.{lang}")) for lang in LANGS}
  for name, n_en, n_fr, en, fr in zip(names, counts["en"], counts["fr"], sides["en"],
                                      sides["fr"]):
    if n_en != n_fr:
      raise DataError(f"{en} has {n_en} lines but {fr} has {n_fr}: corpus {name} is not "
                      "parallel (an incomplete download?)")
  return sum(counts["en"])


def _folder(src: str, archive: str, scratch: str) -> str:
  """The unpacked folder of `archive` in `src`, unpacking the archive into `scratch` first if
  only the archive is there."""
  folder = os.path.join(src, ARCHIVES[archive])
  if os.path.isdir(folder):
    return folder
  path = os.path.join(src, archive)
  if not os.path.isfile(path):
    raise DataError(f"{src}: neither {archive} nor {ARCHIVES[archive]}/ is there; download "
                    f"{URL}{archive} into it")
  try:
    sources.untar(path, scratch)
  except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
    raise sources.unpack_error(path, e) from None
  folder = os.path.join(scratch, ARCHIVES[archive])
  if not os.path.isdir(folder):
    raise DataError(f"{path}: holds no {ARCHIVES[archive]}/ folder; is it the archive of {URL}?")
  return folder


def convert(src: str, out: str) -> dict[str, int]:
  """Writes the text-source folder `out` from Schwenk's download in `src`; {split: pairs}."""
  if not os.path.isdir(src):
    raise DataError(f"{src}: folder not found (--src)")
  os.makedirs(out, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".schwenk-unpacked-", dir=out)
  try:
    train_files = _files(_folder(src, "bitexts.tgz", scratch))
    if not train_files:
      raise DataError(f"{src}: bitexts.selected/ holds no <corpus>.{{en,fr}}.gz files")
    dev_files = _files(_folder(src, "dev+test.tgz", scratch))
    stems = list(train_files)
    sizes = {"train": _write_pair(_sides(train_files, stems), out, "train", stems)}
    for split, stem in SPLITS.items():
      if stem not in dev_files:
        raise DataError(f"{src}: dev/{stem}.{{en,fr}} not found (from dev+test.tgz)")
      sizes[split] = _write_pair(_sides(dev_files, [stem]), out, split, [stem])
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return sizes


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.data.schwenk",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True,
                      help="folder with bitexts.tgz and dev+test.tgz (or their unpacked folders)")
  parser.add_argument("--out", required=True, help="text-source folder to write")
  args = parser.parse_args(argv)
  sizes = convert(args.src, args.out)
  print(", ".join(f"{split}: {n:,} pairs" for split, n in sizes.items()) +
        f" in {args.out}; train with --data.source=text --data.path={args.out} "
        "--data.tokenizer=none")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line, under the error policy every command shares (`s2s_jax.cli.run`)."""
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
