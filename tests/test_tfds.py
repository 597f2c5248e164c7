"""The tfds source without TensorFlow or network: tfds.testing.mock_data, data that is not there
(offline or with data.download=false: an immediate error), and the real WMT'14 builder run on
tiny archives, through the manual-dir route and through TFDS's own download (its HTTP fetch
replaced by copies), then read back from its array_record files."""

import gzip
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from s2s_jax.config import DataConfig  # noqa: E402
from s2s_jax.data import net, pipeline, sources  # noqa: E402
from s2s_jax.data.sources import DataError  # noqa: E402

WMT14_FILES = ["training-parallel-europarl-v7.tgz", "training-parallel-commoncrawl.tgz",
               "training-parallel-un.tgz", "training-parallel-nc-v9.tgz",
               "training-giga-fren.tar", "dev.tgz"]


class Probe:
  """Stands in for `net.unreachable`: records the URLs asked about, gives `answer`."""

  def __init__(self):
    self.answer, self.asked = "www.statmt.org:80: Name or service not known", []

  def __call__(self, urls, timeout=net.PROBE_TIMEOUT):
    self.asked.append(sorted(urls))
    return self.answer


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """Any attempt to reach the network fails the test; the probe says there is none."""
  def refuse(*args, **kwargs):
    raise AssertionError("the network was used")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  probe = Probe()
  monkeypatch.setattr(net, "unreachable", probe)
  # TFDS leaves an empty mkdtemp folder per unprepared builder: keep them out of /tmp
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  tfds.disable_progress_bar()
  return probe


@pytest.fixture
def online(offline):
  """The probe says the download hosts answer (the sockets still refuse)."""
  offline.answer = ""
  return offline


@pytest.fixture
def no_prepare(monkeypatch):
  def refuse(self, *args, **kwargs):
    raise AssertionError("download_and_prepare was called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def cfg(**kw):
  return DataConfig(**{"source": "tfds", "tokenizer": "none", **kw})


def read_all(c):
  """{split: raw pairs}, each split read on its own (`sources.read_split`)."""
  return {split: sources.read_split(c, split) for split in sources.SPLITS}


def test_mock_data_runs_through_the_whole_pipeline(tmp_path, online):
  with tfds.testing.mock_data(num_examples=9):
    pairs = read_all(cfg(tfds_data_dir=str(tmp_path)))
    corpus = pipeline.load_corpus(cfg(tfds_data_dir=str(tmp_path)), str(tmp_path / "wd"))
  assert {split: len(p) for split, p in pairs.items()} == {"train": 9, "valid": 9, "test": 9}
  src, tgt = pairs["train"][0]
  assert isinstance(src, str) and isinstance(tgt, str) and src and tgt and src != tgt
  assert corpus.stats["train"]["pairs"] == 9 and len(corpus.examples["test"]) > 0
  assert corpus.tokens["train"][0] == (src.split(), tgt.split())


def test_mock_data_checks_the_languages(online):
  with tfds.testing.mock_data(num_examples=2), pytest.raises(DataError) as e:
    read_all(cfg(src_lang="de"))
  assert str(e.value) == ("TFDS dataset wmt14_translate/fr-en has the languages en, fr, not 'de' "
                          "(data.src_lang / data.tgt_lang)")


WMT14_URLS = ["http://data.statmt.org/wmt19/translation-task/dev.tgz",
              "http://www.statmt.org/wmt10/training-giga-fren.tar",
              "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
              "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
              "http://www.statmt.org/wmt13/training-parallel-un.tgz",
              "http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz"]


@pytest.mark.parametrize("download", [True, False])
def test_data_that_is_not_there_fails_at_once_saying_what_to_download(tmp_path, no_prepare,
                                                                      offline, download):
  with pytest.raises(DataError) as e:
    read_all(cfg(tfds_data_dir=str(tmp_path), download=download))
  msg = str(e.value)
  assert "\n" not in msg
  why = ("cannot be downloaded from here (www.statmt.org:80: Name or service not known)"
         if download else "data.download=false")
  assert msg.startswith(f"TFDS dataset wmt14_translate/fr-en is not prepared in {tmp_path}/"
                        f"wmt14_translate/fr-en/1.0.0 and {why}: download ")
  for name in WMT14_FILES:
    assert f"/{name}" in msg
  assert "--data.tfds_manual_dir=FOLDER" in msg and "--data.source=text" in msg
  assert offline.asked == ([WMT14_URLS] if download else [])  # the hosts of all six archives
  with pytest.raises(DataError, match="Dataset no_such_dataset not found"):
    read_all(cfg(tfds_name="no_such_dataset/x", tfds_data_dir=str(tmp_path)))


def test_manual_dir_with_missing_archives_lists_them_and_downloads_nothing(tmp_path, no_prepare):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "dev.tgz").write_bytes(b"")
  with pytest.raises(DataError) as e:
    read_all(cfg(tfds_data_dir=str(tmp_path / "d"), tfds_manual_dir=str(manual)))
  msg = str(e.value)
  assert msg.startswith(f"{manual}: 5 of the 6 files wmt14_translate/fr-en is built from are "
                        "missing (nothing is downloaded): training-parallel-europarl-v7.tgz "
                        "(http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz)")
  assert "training-giga-fren.tar (http://www.statmt.org/wmt10/training-giga-fren.tar)" in msg
  assert "dev.tgz" not in msg
  with pytest.raises(DataError, match="folder not found"):
    read_all(cfg(tfds_data_dir=str(tmp_path / "d"), tfds_manual_dir=str(tmp_path / "x")))


# ----------------------------------------------------------------------------- manual-dir route


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _lines(tag, lang, n):
  return "".join(f"{tag} {lang} {i} .\n" for i in range(n)).encode()


def write_wmt14_archives(folder):
  """Tiny stand-ins of the six WMT'14 fr-en archives, laid out as the real ones."""
  os.makedirs(folder, exist_ok=True)
  stems = {"training-parallel-europarl-v7.tgz": ("ep", "training/europarl-v7.fr-en"),
           "training-parallel-commoncrawl.tgz": ("cc", "commoncrawl.fr-en"),
           "training-parallel-un.tgz": ("un", "un/undoc.2000.fr-en"),
           "training-parallel-nc-v9.tgz": ("nc", "training/news-commentary-v9.fr-en")}
  for fname, (tag, stem) in stems.items():
    with tarfile.open(os.path.join(folder, fname), "w:gz") as tar:
      for lang in ("en", "fr"):
        _add(tar, f"{stem}.{lang}", _lines(tag, lang, 2))
  with tarfile.open(os.path.join(folder, "training-giga-fren.tar"), "w") as tar:
    for lang in ("en", "fr"):
      _add(tar, f"giga-fren.release2.fixed.{lang}.gz", gzip.compress(_lines("gf", lang, 2)))
  with tarfile.open(os.path.join(folder, "dev.tgz"), "w:gz") as tar:
    for lang in ("en", "fr"):
      _add(tar, f"dev/newstest2013.{lang}", _lines("nt13", lang, 3))
    for lang, kind in (("fr", "src"), ("en", "ref")):
      segs = "".join(f'<seg id="{i + 1}">nt14 {lang} {i} é .</seg>\n' for i in range(4))
      _add(tar, f"dev/newstest2014-fren-{kind}.{lang}.sgm", f"<doc>\n{segs}</doc>\n".encode())


@pytest.fixture
def unregistered(monkeypatch):
  """The tiny archives have no registered checksums (the real ones do: see the mismatch tests)."""
  from tensorflow_datasets.core.download import checksums
  from tensorflow_datasets.translate import wmt14
  monkeypatch.setattr(sources, "registered_url_infos", lambda builder: {})
  monkeypatch.setattr(checksums, "get_all_url_infos", lambda: {})  # TFDS's download manager's
  cls = wmt14.Wmt14Translate  # (monkeypatch would read the old value: TFDS's checksum files)
  assert "url_infos" not in cls.__dict__
  cls.url_infos = {}
  yield
  del cls.url_infos


def expected_pairs():
  train = [(f"{tag} en {i} .", f"{tag} fr {i} .") for tag in ("cc", "ep", "gf", "nc", "un")
           for i in range(2)]
  return {"train": train, "valid": [(f"nt13 en {i} .", f"nt13 fr {i} .") for i in range(3)],
          "test": [(f"nt14 en {i} é .", f"nt14 fr {i} é .") for i in range(4)]}


def test_manual_dir_builds_wmt14_with_the_real_builder_and_reads_it_back(tmp_path, unregistered):
  manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
  write_wmt14_archives(manual)
  built = read_all(cfg(tfds_data_dir=data, tfds_manual_dir=manual))
  assert {split: sorted(p) for split, p in built.items()} == expected_pairs()
  variant = os.path.join(data, "wmt14_translate", "fr-en", "1.0.0")
  assert any(n.startswith("wmt14_translate-train.array_record") for n in os.listdir(variant))
  # prepared once: later runs read the array_record files (no manual dir, nothing rebuilt)
  again = read_all(cfg(tfds_data_dir=data))
  assert again == built
  swapped = read_all(cfg(tfds_data_dir=data, src_lang="fr", tgt_lang="en"))
  assert swapped["test"] == [(t, s) for s, t in built["test"]]


def test_a_registered_checksum_that_does_not_match_is_an_error(tmp_path, unregistered,
                                                               monkeypatch):
  from tensorflow_datasets.core.download import checksums
  url = "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz"
  wrong = checksums.UrlInfo(size=1, checksum="0" * 64, filename="training-parallel-europarl-v7.tgz")
  monkeypatch.setattr(sources, "registered_url_infos", lambda builder: {url: wrong})
  manual = str(tmp_path / "manual")
  write_wmt14_archives(manual)
  with pytest.raises(DataError) as e:
    read_all(cfg(tfds_data_dir=str(tmp_path / "data"), tfds_manual_dir=manual))
  assert str(e.value).startswith(f"preparing wmt14_translate/fr-en from {manual} failed: "
                                 "NonMatchingChecksumError")


# ----------------------------------------------------------------------------- download route


@pytest.fixture
def fake_downloads(monkeypatch, tmp_path, online):
  """TFDS's HTTP fetch serves copies of the tiny archives; returns the URLs fetched, in order."""
  from tensorflow_datasets.core.download import checksums, downloader
  served = str(tmp_path / "served")
  write_wmt14_archives(served)
  fetched = []

  def fetch(self, url, destination_path, verify=True):
    fetched.append(url)
    path = destination_path / url.rsplit("/", 1)[-1]
    shutil.copyfile(os.path.join(served, path.name), path)
    return downloader.DownloadResult(path=path, url_info=checksums.compute_url_info(path))

  monkeypatch.setattr(downloader._Downloader, "_sync_download", fetch)
  return fetched


def test_download_builds_wmt14_with_tfds_and_reads_it_back(tmp_path, unregistered, fake_downloads,
                                                           online):
  data = str(tmp_path / "data")
  built = read_all(cfg(tfds_data_dir=data))
  assert {split: sorted(p) for split, p in built.items()} == expected_pairs()
  assert sorted(fake_downloads) == WMT14_URLS and online.asked == [WMT14_URLS]
  variant = os.path.join(data, "wmt14_translate", "fr-en", "1.0.0")
  assert any(n.startswith("wmt14_translate-train.array_record") for n in os.listdir(variant))
  extracted = os.listdir(os.path.join(data, "downloads", "extracted"))  # by Python, not TF
  assert sorted(n.split(".", 1)[0] for n in extracted) == ["TAR"] + ["TAR_GZ"] * 5
  # prepared once: later runs read the array_record files, downloading nothing
  fake_downloads.clear()
  assert read_all(cfg(tfds_data_dir=data, download=False)) == built
  assert read_all(cfg(tfds_data_dir=data)) == built
  assert fake_downloads == [] and len(online.asked) == 1


def test_a_download_that_does_not_match_its_registered_checksum_is_an_error(
    tmp_path, unregistered, fake_downloads, monkeypatch):
  from tensorflow_datasets.core.download import checksums
  url = "http://www.statmt.org/wmt13/training-parallel-un.tgz"  # registered by WMT'13 only
  wrong = checksums.UrlInfo(size=1, checksum="0" * 64, filename="training-parallel-un.tgz")
  monkeypatch.setattr(checksums, "get_all_url_infos", lambda: {url: wrong})
  data = str(tmp_path / "data")
  with pytest.raises(DataError) as e:
    read_all(cfg(tfds_data_dir=data))
  assert str(e.value).startswith(
      f"downloading and preparing wmt14_translate/fr-en in {data}/wmt14_translate/fr-en/1.0.0 "
      f"failed: NonMatchingChecksumError: Artifact {url}, downloaded to ")
  assert "(not the file TFDS registered" in str(e.value) and "\n" not in str(e.value)


def test_one_process_downloads_while_the_others_wait(tmp_path, unregistered, fake_downloads,
                                                     monkeypatch):
  """Two jax.distributed processes, played one after the other: process 0 opens (and
  downloads) before the barrier, process 1 only after it, and then downloads nothing."""
  import jax
  from jax.experimental import multihost_utils
  rank, events = [0], []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: rank[0])
  monkeypatch.setattr(multihost_utils, "sync_global_devices",
                      lambda name: events.append(("barrier", rank[0], len(fake_downloads))))
  builder = sources.tfds_builder
  monkeypatch.setattr(sources, "tfds_builder",
                      lambda c: events.append(("open", rank[0])) or builder(c))
  data = str(tmp_path / "data")
  first = sources.read_split(cfg(tfds_data_dir=data), "train")
  rank[0] = 1
  assert sources.read_split(cfg(tfds_data_dir=data), "train") == first
  assert events == [("open", 0), ("barrier", 0, 6), ("barrier", 1, 6), ("open", 1)]
  assert sorted(fake_downloads) == WMT14_URLS


def test_tfrecord_data_without_tensorflow_says_how_to_read_it(tmp_path, unregistered,
                                                              monkeypatch):
  manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
  write_wmt14_archives(manual)
  read_all(cfg(tfds_data_dir=data, tfds_manual_dir=manual))
  info_path = os.path.join(data, "wmt14_translate", "fr-en", "1.0.0", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"  # as if prepared by TensorFlow's default writer
  with open(info_path, "w") as f:
    json.dump(info, f)
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
  with pytest.raises(DataError) as e:
    read_all(cfg(tfds_data_dir=data))
  assert str(e.value) == (f"{data}/wmt14_translate/fr-en/1.0.0: wmt14_translate/fr-en was "
                          "prepared as tfrecord, which only TensorFlow can read: pip install "
                          "tensorflow-cpu, or prepare it again with file_format='array_record' "
                          "(what --data.tfds_manual_dir does)")


def test_archives_are_unpacked_again_when_they_change_and_garbage_is_an_error(tmp_path):
  manual, out = str(tmp_path / "manual"), str(tmp_path / "extracted")
  os.makedirs(manual)
  for text in ("first", "second"):
    with tarfile.open(os.path.join(manual, "a.tgz"), "w:gz") as tar:
      _add(tar, "dir/x.txt", text.encode())
    os.utime(os.path.join(manual, "a.tgz"), ns=(0, len(text)))  # a distinct modification time
    sources.extract_archives(manual, ["a.tgz", "notes.txt"], out)
    with open(os.path.join(out, "TAR_GZ.a.tgz", "dir", "x.txt")) as f:
      assert f.read() == text
  assert sorted(os.listdir(out)) == ["TAR_GZ.a.tgz", "TAR_GZ.a.tgz.from"]
  with open(os.path.join(manual, "b.tar"), "wb") as f:
    f.write(b"not a tar file at all" * 30)
  with pytest.raises(DataError, match=r"b\.tar: cannot unpack .*is the download complete\?") as e:
    sources.extract_archives(manual, ["b.tar"], out)
  assert "\n" not in str(e.value)


def test_single_files_and_zips_are_unpacked_without_tensorflow(tmp_path):
  """What TFDS's download manager may ask of the stand-in extractor, besides tar archives."""
  import bz2
  import zipfile

  from tensorflow_datasets.core.download import resource as resource_lib
  kind = resource_lib.ExtractMethod
  (tmp_path / "a.gz").write_bytes(gzip.compress(b"gz text\n"))
  (tmp_path / "a.bz2").write_bytes(bz2.compress(b"bz2 text\n"))
  with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
    z.writestr("dir/x.txt", "zip text\n")
  for name, method in (("a.gz", kind.GZIP), ("a.bz2", kind.BZIP2), ("a.zip", kind.ZIP)):
    sources.unpack_archive(str(tmp_path / name), method, str(tmp_path / f"out-{name}"))
  assert (tmp_path / "out-a.gz").read_bytes() == b"gz text\n"
  assert (tmp_path / "out-a.bz2").read_bytes() == b"bz2 text\n"
  assert (tmp_path / "out-a.zip" / "dir" / "x.txt").read_bytes() == b"zip text\n"
  (tmp_path / "b.gz").write_bytes(gzip.compress(bytes(range(256)) * 40)[:100])  # cut short
  with pytest.raises(DataError, match=r"b\.gz: cannot unpack .*is the download complete\?"):
    sources.unpack_archive(str(tmp_path / "b.gz"), kind.GZIP, str(tmp_path / "out-b"))
  assert not os.path.exists(tmp_path / "out-b.incomplete")
