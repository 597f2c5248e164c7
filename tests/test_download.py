"""Downloads without network in the tests: the reachability probe (`net.unreachable`) on local
sockets, and official test sets by name (`evaluate --testset`) from a sacreBLEU cache that the
test fills exactly as the offline error message says."""

import io
import json
import os
import socket
import tarfile
import threading

import pytest
from test_decode_cli import TINY, run

from s2s_jax import config as c
from s2s_jax import evaluate, train
from s2s_jax.data import net, testsets
from s2s_jax.data.sources import DataError

# ----------------------------------------------------------------------------- the probe


@pytest.fixture
def listening():
  """A local TCP port that accepts connections."""
  server = socket.create_server(("127.0.0.1", 0))
  yield server.getsockname()[1]
  server.close()


@pytest.fixture
def closed_port():
  """A local TCP port that nothing listens on (connections are refused)."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def test_probe_answers_for_every_host(listening, closed_port):
  assert net.unreachable([f"http://127.0.0.1:{listening}/a.tgz"] * 2) == ""
  assert net.unreachable([]) == "" and net.unreachable(["/local/file.tgz"]) == ""
  both = [f"http://127.0.0.1:{listening}/a", f"https://127.0.0.1:{closed_port}/b"]
  assert net.unreachable(both) == f"127.0.0.1:{closed_port}: Connection refused"


def test_probe_gives_up_on_a_name_lookup_that_hangs(monkeypatch):
  release = threading.Event()
  lookups = []

  def hang(host, *args, **kwargs):
    lookups.append(host)
    release.wait()
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", hang)
  try:
    why = net.unreachable(["http://www.statmt.org/a.tgz"], timeout=0.05)
  finally:
    release.set()
  assert why == "www.statmt.org:80: no answer within 0.05 s" and lookups == ["www.statmt.org"]


def test_probe_connects_to_the_proxy_the_environment_names(monkeypatch):
  for var in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
    monkeypatch.delenv(var, raising=False)
  assert net.endpoint("https://statmt.org/wmt14/test-full.tgz") == ("statmt.org", 443)
  assert net.endpoint("http://www.statmt.org:8080/x") == ("www.statmt.org", 8080)
  monkeypatch.setenv("https_proxy", "proxy.example:3128")
  monkeypatch.setenv("no_proxy", "data.statmt.org")
  assert net.endpoint("https://statmt.org/x.tgz") == ("proxy.example", 3128)
  assert net.endpoint("https://data.statmt.org/x.tgz") == ("data.statmt.org", 443)
  assert net.endpoint("http://statmt.org/x.tgz") == ("statmt.org", 80)  # no http proxy


# ----------------------------------------------------------------------------- sacreBLEU test sets


@pytest.fixture
def no_network(monkeypatch):
  """Sockets refuse; the probe says the network is down and records what it was asked."""
  def refuse(*args, **kwargs):
    raise AssertionError("the network was used")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  asked = []
  monkeypatch.setattr(net, "unreachable",
                      lambda urls: asked.append(list(urls)) or "statmt.org:443: Network is down")
  return asked


@pytest.fixture
def wmt14_full(monkeypatch, tmp_path):
  """sacreBLEU's wmt14/full, cached under tmp_path (as with SACREBLEU=tmp_path/sacrebleu)."""
  from sacrebleu.dataset import DATASETS
  dataset = DATASETS["wmt14/full"]
  outdir = str(tmp_path / "sacrebleu" / "wmt14" / "full")
  monkeypatch.setattr(dataset, "_outdir", outdir)
  monkeypatch.setattr(dataset, "_rawdir", os.path.join(outdir, "raw"))
  return dataset


@pytest.fixture(scope="module")
def workdir(toy_corpus, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("testset") / "wd")
  train.train(c.override(c.Config(), {**TINY, "data.path": toy_corpus, "train.num_steps": 40}),
              wd, progress=False)
  return wd


def sgm(lines, lang):
  segs = "".join(f'<seg id="{i}">{line}</seg>\n' for i, line in enumerate(lines, 1))
  return (f'<srcset setid="newstest2014" srclang="any">\n<doc sysid="ref" docid="d1" '
          f'genre="news" origlang="{lang}">\n{segs}</doc>\n</srcset>\n').encode()


def tgz(path, files):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_a_testset_offline_says_where_to_put_it_and_then_evaluates_from_there(
    workdir, toy_corpus, tmp_path, capsys, wmt14_full, no_network):
  args = ["--workdir", workdir, "--testset", "wmt14/full"]
  rc, _, err = run(evaluate, args, capsys)
  raw = wmt14_full._rawdir
  archive = os.path.join(raw, "wmt14_full.test-full.tgz")
  assert rc == 1 and err.endswith("\n") and "Traceback" not in err, err
  assert err.split("\n")[-2] == (
      "error: sacreBLEU test set wmt14/full (en-fr) is not in sacreBLEU's cache and cannot be "
      "downloaded from here (statmt.org:443: Network is down): download "
      f"https://statmt.org/wmt14/test-full.tgz to {archive} and unpack wmt14_full.test-full.tgz "
      f"there, so that {raw} holds test-full/newstest2014-fren-src.en.sgm and "
      "test-full/newstest2014-fren-ref.fr.sgm; or point SACREBLEU=DIR at a cache that has it")
  assert no_network == [["https://statmt.org/wmt14/test-full.tgz"]]
  # do as it says, with the toy corpus's test split standing in for newstest2014
  src_file, ref_file = (os.path.join(toy_corpus, f"test.{lang}") for lang in ("en", "fr"))
  with open(src_file) as fs, open(ref_file) as fr:
    src, ref = fs.read().splitlines(), fr.read().splitlines()
  os.makedirs(raw)
  tgz(archive, {"test-full/newstest2014-fren-src.en.sgm": sgm(src, "en"),
                "test-full/newstest2014-fren-ref.fr.sgm": sgm(ref, "fr")})
  with tarfile.open(archive) as tar:
    tar.extractall(raw, filter="data")
  rc, stdout, err = run(evaluate, args, capsys)
  assert rc == 0, err
  res = json.loads(stdout)
  assert res["name"] == "wmt14/full.en-fr" and res["sentences"] == len(src) == 60
  assert res["results_file"] == os.path.join(workdir, "eval_wmt14_full.en-fr.json")
  assert len(no_network) == 1  # found in the cache: no probe, no download
  # the same figures as the plain files give
  rc, stdout, err = run(evaluate, ["--workdir", workdir, "--src", src_file, "--ref", ref_file],
                        capsys)
  files = json.loads(stdout)
  for key in ("bleu", "bleu_tok", "perplexity", "ppl_tokens", "sentences"):
    assert res[key] == files[key], key
  assert testsets.load("wmt14/full", "en", "fr") == (list(zip(src, ref)), "wmt14/full.en-fr")


def test_a_testset_must_exist_and_have_the_models_language_pair(no_network, capsys):
  with pytest.raises(SystemExit):  # one source of sentences at a time
    evaluate.main(["--workdir", "W", "--testset", "wmt14/full", "--split", "test"])
  assert "give either --src FILE and --ref FILE, --split NAME or --testset NAME" in (
      capsys.readouterr().err)
  with pytest.raises(DataError) as e:
    testsets.load("wmt17", "en", "fr")
  assert str(e.value) == (
      "--testset wmt17 has no en-fr (the model's data.src_lang-data.tgt_lang); its language "
      "pairs: cs-en, de-en, en-cs, en-de, en-fi, en-lv, en-ru, en-tr, en-zh, fi-en, lv-en, ru-en, "
      "tr-en, zh-en")
  with pytest.raises(DataError) as e:
    testsets.load("wmt14/ful", "en", "fr")
  assert str(e.value).startswith("--testset wmt14/ful: no such sacreBLEU test set; did you mean "
                                 "wmt14/full")
  assert no_network == []
