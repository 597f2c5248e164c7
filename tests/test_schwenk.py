"""Schwenk's selection (the paper's corpus) into a text-source folder, on a made-up miniature of
its two archives: bitexts.tgz (bitexts.selected/<corpus>.{en,fr}.gz) and dev+test.tgz
(dev/ntst1213.*, dev/ntst14.*)."""

import gzip
import io
import os
import tarfile

import pytest

from s2s_jax.data import schwenk, sources

CORPORA = {"ep7_pc45": 3, "crawl": 2, "un2000_pc34": 4}  # lines per corpus


def lines(tag, lang, n):
  return [f"{tag} {lang} {i} , l' été ." for i in range(n)]


def text(rows, final_newline=True):
  return ("\n".join(rows) + ("\n" if final_newline else "")).encode()


def add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_download(folder, short=None):
  """The two archives as downloaded from the LIUM page (`short`: a corpus whose French side
  lacks its last line)."""
  os.makedirs(folder, exist_ok=True)
  with tarfile.open(os.path.join(folder, "bitexts.tgz"), "w:gz") as tar:
    for corpus, n in CORPORA.items():
      for lang in ("en", "fr"):
        rows = lines(corpus, lang, n - (corpus == short and lang == "fr"))
        data = text(rows, final_newline=corpus != "crawl")  # one file ends without a newline
        add(tar, f"bitexts.selected/{corpus}.{lang}.gz", gzip.compress(data))
  with tarfile.open(os.path.join(folder, "dev+test.tgz"), "w:gz") as tar:
    for stem, n in (("ntst1213", 5), ("ntst14", 3)):
      for lang in ("en", "fr"):
        add(tar, f"dev/{stem}.{lang}", text(lines(stem, lang, n)))
  return str(folder)


def expected():
  train = [pair for corpus in sorted(CORPORA) for pair in
           zip(lines(corpus, "en", CORPORA[corpus]), lines(corpus, "fr", CORPORA[corpus]))]
  return {"train": train,
          "valid": list(zip(lines("ntst1213", "en", 5), lines("ntst1213", "fr", 5))),
          "test": list(zip(lines("ntst14", "en", 3), lines("ntst14", "fr", 3)))}


def test_archives_become_a_text_source_folder(tmp_path, capsys):
  src, out = write_download(tmp_path / "download"), str(tmp_path / "out")
  assert schwenk.main(["--src", src, "--out", out]) == 0
  assert capsys.readouterr().out == (
      f"train: 9 pairs, valid: 5 pairs, test: 3 pairs in {out}; train with --data.source=text "
      f"--data.path={out} --data.tokenizer=none\n")
  assert sorted(os.listdir(out)) == [f"{s}.{lang}" for s in ("test", "train", "valid")
                                     for lang in ("en", "fr")]  # nothing else left behind
  assert {split: sources.read_text_pair(out, split, "en", "fr")
          for split in sources.SPLITS} == expected()
  with open(os.path.join(out, "train.fr"), encoding="utf-8") as f:
    assert f.read() == "".join(line + "\n" for _, line in expected()["train"])


def test_unpacked_folders_give_the_same_files(tmp_path):
  src = write_download(tmp_path / "download")
  unpacked = tmp_path / "unpacked"
  for archive in ("bitexts.tgz", "dev+test.tgz"):
    with tarfile.open(os.path.join(src, archive)) as tar:
      tar.extractall(unpacked, filter="data")
  selected = unpacked / "bitexts.selected"
  for name in os.listdir(selected)[:2]:  # some gunzipped already, as `gunzip` leaves them
    (selected / name[:-3]).write_bytes(gzip.decompress((selected / name).read_bytes()))
    os.remove(selected / name)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  schwenk.convert(src, a)
  assert schwenk.convert(str(unpacked), b) == {"train": 9, "valid": 5, "test": 3}
  for name in os.listdir(a):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_downloads_are_one_line_errors(tmp_path, capsys):
  src, out = write_download(tmp_path / "download", short="un2000_pc34"), str(tmp_path / "out")
  assert schwenk.main(["--src", src, "--out", out]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "/bitexts.selected/un2000_pc34.en.gz has 4 lines but " in err
  assert "/bitexts.selected/un2000_pc34.fr.gz has 3: corpus un2000_pc34 is not parallel" in err
  assert not [n for n in os.listdir(out) if n.startswith(".schwenk")]  # scratch removed
  os.remove(os.path.join(src, "dev+test.tgz"))
  with pytest.raises(sources.DataError) as e:
    schwenk.convert(src, out)
  assert str(e.value) == (f"{src}: neither dev+test.tgz nor dev/ is there; download "
                          f"{schwenk.URL}dev+test.tgz into it")
  with open(os.path.join(src, "dev+test.tgz"), "wb") as f:
    f.write(b"\x1f\x8b truncated")
  with pytest.raises(sources.DataError, match=r"dev\+test\.tgz: cannot unpack .*complete\?"):
    schwenk.convert(src, out)
