"""The data layer: vocabularies, tokenizers, reversal, filtering, bucketing, resuming."""

import json
import logging
import os

import numpy as np
import pytest
from conftest import corpora

from s2s_jax.config import DataConfig
from s2s_jax.data import pipeline, sources, synthetic, tokenize
from s2s_jax.data.sources import DataError
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab


def write_corpus(folder, splits, src_lang="en", tgt_lang="fr"):
  """splits: {split: [(source line, target line)]} -> a text-source folder."""
  os.makedirs(folder, exist_ok=True)
  for split, pairs in splits.items():
    for lang, side in ((src_lang, 0), (tgt_lang, 1)):
      with open(os.path.join(folder, f"{split}.{lang}"), "w", encoding="utf-8") as f:
        f.write("".join(p[side] + "\n" for p in pairs))
  return str(folder)


def text_cfg(path, **kw):
  return DataConfig(**{"source": "text", "path": str(path), "tokenizer": "none", **kw})


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_keeps_most_frequent_with_string_order_ties_and_maps_the_rest_to_unk():
  sents = [["b", "a", "c", "a", "b", "d"], ["c", "e", "zz", "zz", "zz"]]
  v = Vocab.build(sents, 4)  # counts: zz 3; a, b, c 2; d, e 1
  assert v.tokens == list(SPECIALS) + ["zz", "a", "b", "c"]
  v5 = Vocab.build(sents, 5)  # d and e tie at 1: d wins (string order)
  assert v5.tokens[-1] == "d"
  assert v.encode(["a", "zz", "d", "e", "never"]) == [5, 4, UNK_ID, UNK_ID, UNK_ID]
  assert Vocab.build(sents, 0).tokens == list(SPECIALS)
  assert Vocab.build(reversed(sents), 4).tokens == v.tokens  # order of the corpus does not matter


def test_vocab_specials_in_text_are_unknown_words_and_oov_rate_counts_them():
  v = Vocab.build([["a", "</s>", "<pad>", "<s>", "<unk>", "a"]], 10)
  assert v.tokens == list(SPECIALS) + ["a"]  # specials seen in text are not counted as words
  assert v.encode(["</s>", "<pad>", "<s>", "<unk>", "a"]) == [UNK_ID] * 4 + [4]
  assert v.oov_rate([["a", "</s>"], ["b", "a", "a"]]) == pytest.approx(2 / 5)
  assert v.oov_rate([]) == 0.0
  assert v.decode([4, BOS_ID, 4, PAD_ID, UNK_ID, EOS_ID, 4]) == ["a", "a", "<unk>"]


def test_vocab_save_load_round_trip(tmp_path):
  v = Vocab.build([["é", "l'", "«", "naïve", "日本", "a"], ["a", "«"]], 100)
  path = str(tmp_path / "v.txt")
  v.save(path)
  w = Vocab.load(path)
  assert w.tokens == v.tokens and w.tokens[4:6] == ["a", "«"]
  with open(path, encoding="utf-8") as f:
    assert f.read().split("\n")[:5] == ["<pad>", "<unk>", "<s>", "</s>", "a"]
  assert w.encode(["日本", "x"]) == [v.index["日本"], UNK_ID]
  with pytest.raises(ValueError, match="cannot hold"):
    Vocab(list(SPECIALS) + ["a\nb"]).save(str(tmp_path / "bad.txt"))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    Vocab.load(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- tokenizers


def test_moses_tokenizes_without_escaping_and_detokenizes_back():
  tok, detok = tokenize.tokenizer("moses", "en"), tokenize.detokenizer("moses", "en")
  s = "Hello, world! It's 5 o'clock & \"A < B\"."
  toks = tok(s)
  assert toks[:4] == ["Hello", ",", "world", "!"] and "&" in toks and "<" in toks
  assert "'s" in toks
  assert detok(toks) == s
  fr = tokenize.tokenizer("moses", "fr")("L'homme a dit : « bonjour » !")
  assert fr[:2] == ["L'", "homme"] and "«" in fr


def test_none_tokenizer_splits_on_whitespace_and_joins_with_spaces():
  assert tokenize.tokenizer("none", "en")("  a  b\tc ") == ["a", "b", "c"]
  assert tokenize.detokenizer("none", "fr")(["a", "b"]) == "a b"
  with pytest.raises(DataError, match="data.tokenizer must be one of"):
    tokenize.tokenizer("bpe", "en")


def test_sentencepiece_is_trained_in_the_workdir_reloaded_and_round_trips(tmp_path):
  words = ["le", "petit", "chien", "voit", "la", "vieille", "femme", "été", "café"]
  train = [(f"the dog number {i} sees cat {i % 7}", " ".join(words[j % 9] for j in range(i, i + 5)))
           for i in range(60)]
  folder = write_corpus(tmp_path / "c", {"train": train, "valid": train[:5], "test": train[5:9]})
  wd = str(tmp_path / "wd")
  cfg = text_cfg(folder, tokenizer="sentencepiece", spm_vocab_size=40)
  corpus = pipeline.load_corpus(cfg, wd)
  for lang in ("en", "fr"):
    assert os.path.exists(os.path.join(wd, f"spm.{lang}.model"))
  tok = tokenize.tokenizer("sentencepiece", "fr", wd)
  detok = tokenize.detokenizer("sentencepiece", "fr", wd)
  pieces = tok(train[3][1])
  assert pieces == corpus.tokens["train"][3][1] and pieces[0].startswith("\u2581")
  assert detok(pieces) == train[3][1]
  assert detok(corpus.tgt_vocab.decode(corpus.examples["train"][3][1])) == train[3][1]
  assert len(corpus.tgt_vocab) <= 40 + 4  # pieces (at most spm_vocab_size) plus the specials
  # training is deterministic: a second WORKDIR gets the same model
  pipeline.load_corpus(cfg, str(tmp_path / "wd2"))
  for lang in ("en", "fr"):
    with open(os.path.join(wd, f"spm.{lang}.model"), "rb") as a, \
         open(tmp_path / "wd2" / f"spm.{lang}.model", "rb") as b:
      assert a.read() == b.read()
  with pytest.raises(DataError, match="needs"):
    tokenize.tokenizer("sentencepiece", "en")
  with pytest.raises(DataError, match=r"spm\.de\.model"):
    tokenize.tokenizer("sentencepiece", "de", wd)


# ----------------------------------------------------------------------------- corpus


def test_source_is_reversed_target_is_not_and_only_the_target_ends_with_eos(tmp_path):
  folder = write_corpus(tmp_path / "c", {"train": [("a b c", "x y z"), ("b", "y")],
                                         "valid": [("c a", "z x")], "test": [("a", "x")]})
  for reverse in (True, False):
    c = pipeline.load_corpus(text_cfg(folder, reverse_source=reverse), None)
    sv, tv = c.src_vocab, c.tgt_vocab
    src, tgt = c.examples["train"][0]
    forward = [sv.index[w] for w in "a b c".split()]
    assert src == (forward[::-1] if reverse else forward)
    assert tgt == [tv.index[w] for w in "x y z".split()] + [EOS_ID]
    assert EOS_ID not in src
    assert c.examples["valid"][0][0] == ([sv.index["a"], sv.index["c"]] if reverse
                                         else [sv.index["c"], sv.index["a"]])
    batch = next(pipeline.BatchIterator(c.examples["train"], 2, 2, seed=0))
    row = int(np.argmax(batch["tgt"][:, 0] == tv.index["x"]))
    assert list(batch["src"][row][:3]) == src and list(batch["tgt"][row][:4]) == tgt
    assert not batch["src"][row][3:].any() and not batch["tgt"][row][4:].any()
  assert pipeline.encode_source(["a", "b", "new"], sv, True) == \
      [UNK_ID, sv.index["b"], sv.index["a"]]


def test_filtering_drops_empty_and_long_pairs_and_counts_them(tmp_path, caplog):
  train = [("a b", "x y"), ("", "x"), ("a", "  "), ("a b c d", "x"), ("a", "x y z w"), ("c", "z")]
  folder = write_corpus(tmp_path / "c", {"train": train,
                                         "valid": [("a b c d e", "x"), ("", "y")],
                                         "test": [("a", "x")]})
  with caplog.at_level(logging.INFO):
    c = pipeline.load_corpus(text_cfg(folder, max_len=3), None)
  assert c.tokens["train"] == [(["a", "b"], ["x", "y"]), (["c"], ["z"])]
  assert {k: c.stats["train"][k] for k in ("pairs", "kept", "empty", "too_long")} == \
      {"pairs": 6, "kept": 2, "empty": 2, "too_long": 2}
  # evaluation splits lose empty pairs only, never long ones
  assert c.tokens["valid"] == [(["a", "b", "c", "d", "e"], ["x"])]
  assert (c.stats["valid"]["empty"], c.stats["valid"]["too_long"]) == (1, 0)
  assert "data train: 6 pairs read, 2 kept; dropped 2 with an empty side, 2 with more than 3" \
      in caplog.text
  unlimited = pipeline.load_corpus(text_cfg(folder, max_len=0), None)
  assert unlimited.stats["train"]["kept"] == 4


def test_oov_rates_are_returned_per_split(tmp_path):
  folder = write_corpus(tmp_path / "c", {"train": [("a a b", "x x y"), ("a c", "x")],
                                         "valid": [("a q", "x q r")], "test": [("b", "y")]})
  c = pipeline.load_corpus(text_cfg(folder, src_vocab_size=2, tgt_vocab_size=1), None)
  assert c.src_vocab.tokens[4:] == ["a", "b"] and c.tgt_vocab.tokens[4:] == ["x"]
  assert c.stats["train"]["src_oov"] == pytest.approx(1 / 5)  # c
  assert c.stats["train"]["tgt_oov"] == pytest.approx(1 / 4)  # y
  assert c.stats["valid"]["src_oov"] == pytest.approx(1 / 2)
  assert c.stats["valid"]["tgt_oov"] == pytest.approx(2 / 3)
  assert c.stats["test"]["tgt_tokens"] == 1


def test_prepared_corpus_is_made_once_shared_by_workdirs_and_follows_the_text(tmp_path, caplog):
  pairs = [("Hello, world!", "Bonjour, le monde !"), ("It's late.", "Il est tard.")]
  folder = write_corpus(tmp_path / "c", {"train": pairs, "valid": pairs[:1], "test": pairs[1:]})
  wd = str(tmp_path / "wd")
  cfg = text_cfg(folder, tokenizer="moses", prepared_dir=str(tmp_path / "store"))
  first = pipeline.load_corpus(cfg, wd)
  assert os.path.exists(os.path.join(wd, pipeline.SRC_VOCAB_FILE))
  assert len(corpora(tmp_path / "store")) == 1  # one prepared corpus, no leftovers
  caplog.clear()
  with caplog.at_level(logging.INFO):
    second = pipeline.load_corpus(cfg, wd)
    other = pipeline.load_corpus(cfg, str(tmp_path / "wd2"))  # another WORKDIR: same corpus
  assert caplog.text.count("prepared corpus") == 2 and "prepared 4 pairs" not in caplog.text
  assert "vocabularies reloaded" in caplog.text
  assert second.tokens == first.tokens and second.examples == first.examples == other.examples
  assert second.src_vocab.tokens == first.src_vocab.tokens == pipeline.load_vocabs(wd)[0].tokens
  # edited text: another key, prepared again
  write_corpus(tmp_path / "c", {"train": [("Hello, there!", "Salut !")] + pairs[1:]})
  caplog.clear()
  with caplog.at_level(logging.INFO):
    third = pipeline.load_corpus(cfg, wd)
  assert "prepared 4 pairs" in caplog.text and len(corpora(tmp_path / "store")) == 2
  assert third.tokens["train"][0] == (["Hello", ",", "there", "!"], ["Salut", "!"])
  with pytest.raises(DataError, match="fresh WORKDIR"):
    pipeline.load_corpus(text_cfg(folder, tokenizer="moses", src_vocab_size=1), wd)


def test_synthetic_source_goes_through_the_pipeline():
  cfg = DataConfig(source="synthetic", synthetic_train=120, synthetic_valid=10, synthetic_test=10,
                   synthetic_seed=3, src_vocab_size=5000, tgt_vocab_size=5000)
  raw = synthetic.make_splits(120, 10, 10, seed=3)
  assert {split: sources.read_split(cfg, split) for split in sources.SPLITS} == raw
  c = pipeline.load_corpus(cfg, None)
  assert sum(c.stats[s]["kept"] + c.stats[s]["empty"] + c.stats[s]["too_long"]
             for s in sources.SPLITS) == 140
  s, t = raw["test"][0]
  tok_s, tok_t = tokenize.tokenizer("moses", "en")(s), tokenize.tokenizer("moses", "fr")(t)
  assert c.examples["test"][0] == pipeline.encode_pair(tok_s, tok_t, c.src_vocab, c.tgt_vocab, True)
  assert c.stats["train"]["src_oov"] == 0.0


def test_one_split_is_read_without_the_others(tmp_path, monkeypatch):
  # synthetic: the generator's stream is drawn only up to the end of the split asked for
  stream, drawn = synthetic._pair_stream, [0]

  def counted(seed):
    for pair in stream(seed):
      drawn[0] += 1
      yield pair

  monkeypatch.setattr(synthetic, "_pair_stream", counted)
  huge = DataConfig(source="synthetic", synthetic_train=10**9, synthetic_valid=15,
                    synthetic_test=20, synthetic_seed=3)
  whole = synthetic.make_splits(50, 15, 20, seed=3)
  drawn[0] = 0
  assert sources.read_split(huge, "test") == whole["test"]
  assert 20 <= drawn[0] < 30
  assert sources.read_split(huge, "valid") == whole["valid"]
  # text: only that split's two files are read; the others may be missing
  folder = tmp_path / "text"
  folder.mkdir()
  (folder / "test.en").write_text("a b\nc\n")
  (folder / "test.fr").write_text("x\ny z\n")
  cfg = DataConfig(source="text", path=str(folder))
  assert sources.read_split(cfg, "test") == [("a b", "x"), ("c", "y z")]
  with pytest.raises(DataError, match=r"train\.en: file not found"):
    sources.read_split(cfg, "train")
  with pytest.raises(DataError, match="no split 'dev' in the configured corpus; splits: train, "
                                      "valid, test"):
    sources.read_split(cfg, "dev")


# ----------------------------------------------------------------------------- bucketing


def unique_examples(lengths):
  """Example i has source [10 + i] + padding words, so row -> example is readable off a batch."""
  return [([10 + i] + [4] * (s - 1), [5] * (t - 1) + [EOS_ID]) for i, (s, t) in enumerate(lengths)]


def example_ids(batch):
  return [int(x) - 10 for x in batch["src"][:, 0] if x != PAD_ID]


def test_bucket_lengths_grow_geometrically_in_multiples_of_the_width():
  assert pipeline.bucket_lengths(60, 2, 0.2) == [2, 4, 6, 8, 10, 12, 16, 20, 24, 30, 36, 44, 54, 66]
  assert pipeline.bucket_lengths(61, 5, 0.2) == [5, 10, 15, 20, 25, 30, 40, 50, 60, 75]
  assert pipeline.bucket_lengths(23, 5, 0.0) == [5, 10, 15, 20, 25]
  for n in range(1, 300):
    b = pipeline.bucket_lengths(n, 3, 0.15)
    p = pipeline.padded_length(n, 3, 0.15)
    assert p >= n and p % 3 == 0 and p in b and all(x < n for x in b if x < p)
  # a long tail costs few shapes: lengths up to 1000 use 29 sizes instead of 500
  assert len(pipeline.bucket_lengths(1000, 2, 0.2)) == 29


def test_every_sentence_once_per_epoch_and_a_bounded_set_of_shapes():
  rng = np.random.default_rng(0)
  lengths = [(int(a), int(b)) for a, b in rng.integers(1, 40, size=(203, 2))]
  ex = unique_examples(lengths)
  it = pipeline.BatchIterator(ex, 16, 2, seed=1, bucket_growth=0.2)
  allowed = pipeline.bucket_lengths(40, 2, 0.2)
  assert it.batches_per_epoch == 13  # ceil(203 / 16): only one batch an epoch has empty rows
  seen_shapes = set()
  for epoch in range(3):
    ids = []
    for _ in range(it.batches_per_epoch):
      b = next(it)
      assert b["src"].shape == b["tgt"].shape and b["src"].dtype == np.int32
      seen_shapes.add(b["src"].shape[1])
      rows = example_ids(b)
      longest = max(max(len(ex[i][0]), len(ex[i][1])) for i in rows)
      assert b["src"].shape[1] == pipeline.padded_length(longest, 2, 0.2)
      ids += rows
    assert sorted(ids) == list(range(203)), epoch
  assert it.epoch == 2
  assert sorted(seen_shapes) == it.shapes and set(it.shapes) <= set(allowed)


def test_shuffling_is_seeded_and_changes_between_epochs():
  ex = unique_examples([(i % 9 + 1, i % 5 + 1) for i in range(100)])
  def two_epochs(seed):
    it = pipeline.BatchIterator(ex, 8, 2, seed)
    return [example_ids(next(it)) for _ in range(26)]
  a, b, c = two_epochs(0), two_epochs(0), two_epochs(1)
  assert a == b and a != c
  assert a[:13] != a[13:]  # epoch 1 is not a replay of epoch 0


def _lexsort_plan(lengths, batch_size, bounds, rng):
  """The epoch plan as first written: one lexsort, a bisect per batch."""
  import bisect
  order = np.lexsort((rng.random(len(lengths)), lengths))
  batches = [(bounds[bisect.bisect_left(bounds, int(lengths[order[s:s + batch_size][-1]]))],
              order[s:s + batch_size]) for s in range(0, len(order), batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


@pytest.mark.parametrize("top", [7, 300, 70_000])  # lengths sorted as uint8, uint16, uint32
def test_epoch_plan_equals_the_lexsort_formulation(top):
  lengths = np.random.default_rng(top).integers(1, top, 5000)
  lengths[::7] = 3  # many ties, broken by the seeded random keys
  ex = [([4] * int(n), [EOS_ID]) for n in lengths]
  bounds = pipeline.bucket_lengths(int(lengths.max()), 2, 0.1)
  for seed in range(3):
    got = pipeline.bucketed_batches(ex, 32, 2, np.random.default_rng([seed, 1]), 0.1, lengths)
    want = _lexsort_plan(lengths, 32, bounds, np.random.default_rng([seed, 1]))
    assert [(n, list(i)) for n, i in got] == [(n, list(i)) for n, i in want]


class _CoarseRng:
  """A generator whose random keys repeat (one of 8 values), to take the equal-keys path."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)

  def random(self, n):
    return self.rng.integers(0, 8, n) / 8.0

  def permutation(self, n):
    return self.rng.permutation(n)


def test_epoch_plan_equals_the_lexsort_formulation_when_keys_repeat():
  lengths = np.random.default_rng(5).integers(1, 20, 3000)
  ex = [([4] * int(n), [EOS_ID]) for n in lengths]
  bounds = pipeline.bucket_lengths(int(lengths.max()), 2, 0.1)
  got = pipeline.bucketed_batches(ex, 16, 2, _CoarseRng(0), 0.1, lengths)
  want = _lexsort_plan(lengths, 16, bounds, _CoarseRng(0))
  assert [(n, list(i)) for n, i in got] == [(n, list(i)) for n, i in want]


def test_padding_fraction_on_a_hand_made_case():
  # example lengths max(src, tgt): 2, 3, 3, 5; batches of 2 -> lengths {2,3} -> 4 and {3,5} -> 6
  ex = [([4], [5, EOS_ID]), ([4, 4], [5, 5, EOS_ID]), ([4, 4, 4], [5, 5, EOS_ID]),
        ([4] * 5, [EOS_ID])]
  it = pipeline.BatchIterator(ex, 2, 2, seed=0, bucket_growth=0.0)
  assert sorted(it.shapes) == [4, 6]
  real = 3 + 5 + 6 + 6
  assert it.padding_fraction() == pytest.approx(1 - real / (2 * 4 * 2 + 2 * 6 * 2))  # 0.5
  # a short last batch counts its empty rows as padding
  ex3 = [([4], [EOS_ID]), ([4, 4], [EOS_ID]), ([4] * 4, [5, 5, EOS_ID])]
  plan = pipeline.bucketed_batches(ex3, 2, 2, None, 0.0)
  assert [(length, list(idx)) for length, idx in plan] == [(2, [0, 1]), (4, [2])]
  assert pipeline.padding_fraction(ex3, plan, 2) == pytest.approx(1 - 12 / 24)


def test_eval_batches_cover_every_example_once_in_a_fixed_order():
  ex = unique_examples([(i % 13 + 1, i % 7 + 1) for i in range(50)])
  runs = [[example_ids(b) for b in pipeline.eval_batches(ex, 8, 2)] for _ in range(2)]
  assert runs[0] == runs[1]
  assert sorted(i for b in runs[0] for i in b) == list(range(50))
  flat = [i for b in runs[0] for i in b]
  lengths = [max(len(ex[i][0]), len(ex[i][1])) for i in flat]
  assert lengths == sorted(lengths)
  assert list(pipeline.eval_batches([], 8, 2)) == []


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("stop_after", [3, 7, 8, 11])  # 7 batches an epoch: 7 = at the boundary
def test_restored_iterator_continues_exactly_like_an_uninterrupted_one(stop_after):
  ex = unique_examples([(i % 11 + 1, (3 * i) % 8 + 1) for i in range(53)])
  make = lambda: pipeline.BatchIterator(ex, 8, 2, seed=5)
  ref = make()
  assert ref.batches_per_epoch == 7
  expected = [next(ref) for _ in range(stop_after + 9)]  # crosses one or two epoch boundaries
  run = make()
  for _ in range(stop_after):
    next(run)
  state = json.loads(json.dumps(run.state()))  # what a checkpoint stores
  fresh = make()
  fresh.restore(state)
  for want in expected[stop_after:]:
    got = next(fresh)
    np.testing.assert_array_equal(got["src"], want["src"])
    np.testing.assert_array_equal(got["tgt"], want["tgt"])
  assert fresh.state() == ref.state()


def test_restore_refuses_a_state_from_other_data_or_seed():
  ex = unique_examples([(2, 3)] * 10)
  it = pipeline.BatchIterator(ex, 4, 2, seed=0)
  with pytest.raises(ValueError, match="seed 1"):
    it.restore({"epoch": 0, "index": 1, "seed": 1})
  with pytest.raises(ValueError, match="9 training examples"):
    it.restore({"epoch": 0, "index": 1, "seed": 0, "num_examples": 9})
  it.restore({"epoch": 2, "index": 1})  # an older state without the extra keys still works
  assert (it.epoch, it.index) == (2, 1)


@pytest.mark.parametrize("stop_after", [3, 7, 11])
def test_prefetched_batches_and_position_are_the_iterators(stop_after):
  """Made ahead on a thread, the batches come in the iterator's order, and the position
  (what a checkpoint saves) is after the batches handed out, not after those made ahead."""
  ex = unique_examples([(i % 11 + 1, (3 * i) % 8 + 1) for i in range(53)])
  make = lambda: pipeline.BatchIterator(ex, 8, 2, seed=5)
  ref = make()
  expected = [next(ref) for _ in range(stop_after + 9)]
  ahead = pipeline.Prefetcher(make(), lambda b: dict(b, words=train_words(b)), depth=3)
  positions = []
  for want in expected[:stop_after]:
    got = next(ahead)
    np.testing.assert_array_equal(got["src"], want["src"])
    assert got["words"] == train_words(want)
    positions.append((ahead.epoch, ahead.index))
  plain = make()
  for _ in range(stop_after):
    next(plain)
  assert ahead.state() == plain.state() and positions[-1] == (plain.epoch, plain.index)
  fresh = pipeline.Prefetcher(make(), lambda b: b)
  fresh.restore(json.loads(json.dumps(ahead.state())))
  ahead.close()  # stops the thread; the iterator continues from the position handed out
  for want in expected[stop_after:stop_after + 3]:
    for it in (fresh, ahead):
      np.testing.assert_array_equal(next(it)["tgt"], want["tgt"])
  fresh.close()
  ahead.close()


def train_words(batch):
  return int(np.sum(batch["src"] != PAD_ID))


def test_prefetch_errors_reach_the_consumer():
  ex = unique_examples([(2, 3)] * 10)
  calls = []

  def prepare(batch):
    calls.append(1)
    if len(calls) == 2:
      raise DataError("bad batch")
    return batch

  ahead = pipeline.Prefetcher(pipeline.BatchIterator(ex, 4, 2, seed=0), prepare)
  next(ahead)
  with pytest.raises(DataError, match="bad batch"):
    next(ahead)
