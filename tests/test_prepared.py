"""The prepared corpus store: arrays give the same examples and batches as lists, the pool the
same arrays as one process, interrupted preparations leave nothing usable behind."""

import os

import numpy as np
import pytest
from conftest import corpora, write_toy_corpus

from s2s_jax import train
from s2s_jax.config import DataConfig
from s2s_jax.data import pipeline, prepared, sources, tokenize
from s2s_jax.data.sources import DataError
from s2s_jax.data.vocab import EOS_ID, Vocab


def cfg_for(folder, store, **kw) -> DataConfig:
  return DataConfig(**{"source": "text", "path": str(folder), "tokenizer": "none",
                       "prepared_dir": str(store), "max_len": 4, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("prep")
  folder = write_toy_corpus(str(root / "c"), sizes=(("train", 700), ("valid", 50), ("test", 40)))
  return pipeline.load_corpus(cfg_for(folder, root / "store"), None), folder


def test_examples_equal_the_list_pipeline_of_the_same_tokens(corpus):
  c, folder = corpus
  raw = {s: [(a.split(), b.split()) for a, b in
             zip(open(os.path.join(folder, f"{s}.en")).read().splitlines(),
                 open(os.path.join(folder, f"{s}.fr")).read().splitlines())]
         for s in ("train", "valid")}
  kept = [p for p in raw["train"] if pipeline.within_length(*p, 4)]
  assert 0 < len(kept) < len(raw["train"])  # max_len=4 drops some of the 1..6-word pairs
  assert list(c.tokens["train"]) == kept
  src_vocab = Vocab.build((s for s, _ in kept), 160_000)
  assert c.src_vocab.tokens == src_vocab.tokens
  for split, pairs in (("train", kept), ("valid", raw["valid"])):
    want = [pipeline.encode_pair(s, t, c.src_vocab, c.tgt_vocab, True) for s, t in pairs]
    assert list(c.examples[split]) == want
    assert c.examples[split][3][0] == c.src_vocab.encode(pairs[3][0])[::-1]  # reversed source
    assert c.examples[split][3][1][-1] == EOS_ID
  assert c.stats["train"]["src_tokens"] == sum(len(s) for s, _ in kept)


def test_arrays_and_lists_give_the_same_batches_resume_and_padding(corpus):
  c, _ = corpus
  arrays, lists = c.examples["train"], list(c.examples["train"])
  a = pipeline.BatchIterator(arrays, 16, 2, seed=3)
  b = pipeline.BatchIterator(lists, 16, 2, seed=3)
  assert a.padding_fraction() == pytest.approx(b.padding_fraction(), abs=1e-12)
  for _ in range(a.batches_per_epoch + 5):  # into the second epoch
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["src"], y["src"])
    np.testing.assert_array_equal(x["tgt"], y["tgt"])
  resumed = pipeline.BatchIterator(arrays, 16, 2, seed=3)
  resumed.restore(a.state())
  for _ in range(3):
    np.testing.assert_array_equal(next(resumed)["tgt"], next(b)["tgt"])
  for x, y in zip(pipeline.eval_batches(c.examples["valid"], 8, 2),
                  pipeline.eval_batches(list(c.examples["valid"]), 8, 2), strict=True):
    np.testing.assert_array_equal(x["src"], y["src"])


def reference_batch(examples, idx, batch_size, length, rows=slice(None)):
  """A batch filled row by row from the examples (what the vectorised batches must equal)."""
  batch = {k: np.zeros((batch_size, length), np.int32) for k in ("src", "tgt")}
  lo, hi, _ = rows.indices(batch_size)
  for r in range(lo, min(hi, len(idx))):
    for k, ids in zip(("src", "tgt"), examples[int(idx[r])]):
      batch[k][r, :len(ids)] = ids
  return batch


@pytest.mark.parametrize("reverse", [True, False])
def test_vectorised_batches_equal_row_by_row_ones(corpus, reverse):
  c, _ = corpus
  arrays = c.examples["train"]
  arrays = pipeline.Examples(arrays.split, arrays.rows, arrays.lookups, reverse)
  lists = list(arrays)
  rng = np.random.default_rng(0)
  for n, rows in ((16, slice(None)), (16, slice(4, 12)), (11, slice(None)), (16, slice(8, 16)),
                  (3, slice(8, 16)), (0, slice(None))):
    idx = rng.choice(len(arrays), n, replace=False)
    length = max([pipeline.example_length(lists[i]) for i in idx], default=1) + 2
    want = reference_batch(lists, idx, 16, length, rows)
    for got in (arrays.batch(idx, 16, length, rows), pipeline.batch_of(lists, idx, 16, length,
                                                                        rows)):
      for k in ("src", "tgt"):
        assert got[k].dtype == np.int32
        np.testing.assert_array_equal(got[k], want[k])


def test_a_host_fills_only_its_rows_and_counts_the_words_of_all(corpus):
  """words/s counts the words of every process: each knows the whole batch's lengths."""
  c, _ = corpus
  for examples in (c.examples["train"], list(c.examples["train"])):
    full = next(pipeline.BatchIterator(examples, 16, 2, seed=0))
    rows = pipeline.BatchIterator(examples, 16, 2, seed=0, rows=slice(8, 12))
    part = next(rows)
    np.testing.assert_array_equal(part["src"][8:12], full["src"][8:12])
    assert not part["src"][:8].any() and not part["tgt"][12:].any()
    assert rows.last_words == train.count_words(full) > train.count_words(part)


def test_the_process_pool_writes_the_same_corpus_as_one_process(tmp_path, monkeypatch):
  folder = write_toy_corpus(str(tmp_path / "c"), sizes=(("train", 300), ("valid", 20),
                                                         ("test", 20)))
  one = pipeline.load_corpus(cfg_for(folder, tmp_path / "a", workers=1), None).prepared
  monkeypatch.setattr(prepared, "SERIAL_BELOW", 0)
  monkeypatch.setattr(prepared, "CHUNK_PAIRS", 37)  # many chunks, finished out of order
  two = pipeline.load_corpus(cfg_for(folder, tmp_path / "b", workers=2), None).prepared
  assert one.tables == two.tables
  for split in ("train", "valid", "test"):
    for k in (0, 1):
      np.testing.assert_array_equal(one.splits[split].ids[k], two.splits[split].ids[k])
      np.testing.assert_array_equal(one.splits[split].offsets[k], two.splits[split].offsets[k])
  np.testing.assert_array_equal(one.train_counts[1], two.train_counts[1])


def test_vocabulary_from_the_store_matches_vocab_build(tmp_path):
  train = "b a\na b c\n</s> c c\nd\n<unk> a\nz z z z z z z\n"
  files = {"train.en": train, "train.fr": train, "valid.en": "a\n", "valid.fr": "a\n",
           "test.en": "q\n", "test.fr": "q\n"}
  os.makedirs(tmp_path / "c")
  for name, text in files.items():
    (tmp_path / "c" / name).write_text(text)
  for size in (1, 2, 3, 10):
    c = pipeline.load_corpus(cfg_for(tmp_path / "c", tmp_path / "s", src_vocab_size=size), None)
    kept = [line.split() for line in train.splitlines() if len(line.split()) <= 4]
    assert c.src_vocab.tokens == Vocab.build(kept, size).tokens
  assert c.examples["train"][2][0] == [c.src_vocab.id_of("c")] * 2 + [1]  # "</s>" is <unk>


def test_an_interrupted_preparation_is_never_taken_as_complete(tmp_path, monkeypatch):
  folder = write_toy_corpus(str(tmp_path / "c"))
  cfg = cfg_for(folder, tmp_path / "store")
  calls = {"n": 0}
  real = prepared.tokenize_chunk

  def dies(chunk):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return real(chunk)

  monkeypatch.setattr(prepared, "CHUNK_PAIRS", 100)
  monkeypatch.setattr(prepared, "tokenize_chunk", dies)
  with pytest.raises(KeyboardInterrupt):
    pipeline.load_corpus(cfg, None)
  assert corpora(tmp_path / "store") == []
  # a preparation killed hard (no clean-up) leaves a folder that is not used, then removed
  monkeypatch.setattr(prepared, "tokenize_chunk", real)
  c = pipeline.load_corpus(cfg, None)
  name = os.path.basename(c.prepared.folder)
  dead = tmp_path / "store" / f"{name}.incomplete-{prepared.socket.gethostname()}-999999999"
  os.rename(c.prepared.folder, dead)
  os.remove(dead / "meta.json")
  c2 = pipeline.load_corpus(cfg, None)
  assert sorted(corpora(tmp_path / "store")) == [name] and c2.examples == c.examples


def test_sentencepiece_models_are_trained_once_and_copied_into_each_workdir(tmp_path):
  folder = write_toy_corpus(str(tmp_path / "c"), num_words=40)
  cfg = cfg_for(folder, tmp_path / "store", tokenizer="sentencepiece", spm_vocab_size=30)
  a = pipeline.load_corpus(cfg, str(tmp_path / "wd1"))
  spm = [d for d in corpora(tmp_path / "store") if d.startswith("spm-")]
  assert len(spm) == 1
  stamps = {f: os.stat(tmp_path / "store" / spm[0] / f).st_mtime_ns
            for f in os.listdir(tmp_path / "store" / spm[0])}
  b = pipeline.load_corpus(cfg, str(tmp_path / "wd2"))
  assert stamps == {f: os.stat(tmp_path / "store" / spm[0] / f).st_mtime_ns
                    for f in os.listdir(tmp_path / "store" / spm[0])}  # not trained again
  assert len([d for d in corpora(tmp_path / "store") if not d.startswith("spm-")]) == 1
  for lang in ("en", "fr"):
    with open(tokenize.spm_model_path(str(tmp_path / "wd1"), lang), "rb") as f1, \
         open(tokenize.spm_model_path(str(tmp_path / "wd2"), lang), "rb") as f2:
      assert f1.read() == f2.read()
  assert a.examples == b.examples
  with pytest.raises(DataError, match="WORKDIR"):
    pipeline.load_corpus(cfg, None)


def test_prepare_data_flag_prepares_and_stops(tmp_path, capsys):
  import json

  from s2s_jax import config, train
  folder = write_toy_corpus(str(tmp_path / "c"))
  argv = ["--workdir", str(tmp_path / "wd"), "--prepare_data", "--data.source=text",
          f"--data.path={folder}", "--data.tokenizer=none", f"--data.prepared_dir={tmp_path / 's'}"]
  assert train.main(config.Config(), argv) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert os.path.exists(os.path.join(out["prepared"], "meta.json"))
  assert out["stats"]["train"]["pairs"] == 600
  assert os.path.exists(tmp_path / "wd" / pipeline.SRC_VOCAB_FILE)
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_text_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
  folder = write_toy_corpus(str(tmp_path / "c"), sizes=(("train", 30), ("valid", 5), ("test", 5)))
  cfg = cfg_for(folder, tmp_path / "store")
  first = sources.open_streams(cfg, str(tmp_path / "store"))[1]
  assert (tmp_path / "store" / sources.HASHES_FILE).exists()
  read = []
  real = sources._count_and_hash
  monkeypatch.setattr(sources, "_count_and_hash", lambda p: read.append(p) or real(p))
  assert sources.open_streams(cfg, str(tmp_path / "store"))[1] == first and read == []
  with open(os.path.join(folder, "train.fr"), "a") as f:
    f.write("extra\n")
  with open(os.path.join(folder, "train.en"), "a") as f:
    f.write("extra\n")
  again = sources.open_streams(cfg, str(tmp_path / "store"))
  assert again[1] != first and again[0]["train"].size == 31
  assert sorted(os.path.basename(p) for p in read) == ["train.en", "train.fr"]
  (tmp_path / "store" / sources.HASHES_FILE).write_text("{not json")  # damaged: hashed again
  read.clear()
  assert sources.open_streams(cfg, str(tmp_path / "store"))[1] == again[1] and len(read) == 6
  read.clear()  # and written back whole
  assert sources.open_streams(cfg, str(tmp_path / "store"))[1] == again[1] and read == []


@pytest.mark.parametrize("damage", ["train_id", "valid_id", "truncated", "offsets", "meta"])
def test_a_damaged_store_is_an_error_naming_the_file(tmp_path, damage):
  """Ids beyond the token table are found when a batch takes the sentence (training) or when
  the store is opened (validation, test); sizes, offsets and meta.json when it is opened."""
  folder = write_toy_corpus(str(tmp_path / "c"), sizes=(("train", 100), ("valid", 10),
                                                         ("test", 10)))
  cfg = cfg_for(folder, tmp_path / "store")
  c = pipeline.load_corpus(cfg, None)
  store, row = c.prepared.folder, int(c.examples["train"].rows[5])  # a kept training sentence
  if damage in ("train_id", "valid_id"):
    split, side, row = ("train", "tgt", row) if damage == "train_id" else ("valid", "src", 3)
    path = os.path.join(store, f"{split}.{side}.ids")
    start = np.load(os.path.join(store, f"{split}.{side}.offsets.npy"))[row]
    ids = np.memmap(path, np.uint32, "r+")
    ids[start] = 10**6
    ids.flush()
    del ids
    expect = (f"{path}: sentence {row + 1} holds token id 1000000, beyond the" if damage ==
              "train_id" else f"{path}: token id 1000000 is beyond the")
  elif damage == "truncated":
    path = os.path.join(store, "test.tgt.ids")
    size = os.path.getsize(path)
    os.truncate(path, size - 4)
    expect = f"{path}: {size - 4} bytes, not the {size} of"
  elif damage == "offsets":
    path = os.path.join(store, "train.src.offsets.npy")
    offsets = np.load(path)
    offsets[5] = offsets[4] - 1
    np.save(path, offsets)
    expect = f"{path}: sentence 5 ends before it starts"
  else:
    path = os.path.join(store, "meta.json")
    open(path, "a").write("}")
    expect = f"{path}: unreadable \\(JSONDecodeError"
  expect += ".*: the prepared corpus is damaged; delete " + store
  if damage != "train_id":
    with pytest.raises(DataError, match=expect):
      pipeline.load_corpus(cfg, None)
    return
  c = pipeline.load_corpus(cfg, None)
  batches = pipeline.BatchIterator(c.examples["train"], 16, 2, seed=0)
  with pytest.raises(DataError, match=expect):
    for _ in range(batches.batches_per_epoch):
      next(batches)
  with pytest.raises(DataError, match=expect):
    c.examples["train"][5]


def test_the_store_key_covers_the_tokenizer_code(tmp_path, monkeypatch):
  """A change to the tokenizer's code (tokenize.py, moses.py) prepares the corpus again."""
  from s2s_jax.data import moses
  folder = write_toy_corpus(str(tmp_path / "c"), sizes=(("train", 30), ("valid", 5),
                                                         ("test", 5)))
  cfg = cfg_for(folder, tmp_path / "store", tokenizer="moses")
  names = {os.path.basename(pipeline.load_corpus(cfg, None).prepared.folder)}
  for module in (moses, tokenize):
    fixed = tmp_path / os.path.basename(module.__file__)
    fixed.write_bytes(open(module.__file__, "rb").read() + b"\n# a fix\n")
    monkeypatch.setattr(module, "__file__", str(fixed))
    names.add(os.path.basename(pipeline.load_corpus(cfg, None).prepared.folder))
  assert len(names) == 3 and sorted(corpora(tmp_path / "store")) == sorted(names)
