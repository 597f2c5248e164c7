"""The paper's analyses: PCA of encoder states, BLEU by length and rarity, the longest examples."""

import json
import os

import jax
import numpy as np
import pytest
import sacrebleu

from s2s_jax import bleu, checkpoint, model, optim, train, translate
from s2s_jax import config as c
from s2s_jax.analysis import by_length, long_examples, pca
from s2s_jax.data import pipeline
from s2s_jax.data.vocab import Vocab

TINY = {"data.source": "text", "data.tokenizer": "none", "model.num_layers": 2,
        "model.hidden_size": 12, "model.embed_size": 8, "train.batch_size": 16,
        "decode.batch_size": 16, "decode.beam_size": 2}


def make_workdir(corpus: str, workdir: str, **updates) -> c.Config:
  """A decodable WORKDIR holding an untrained tiny model (no training step is compiled)."""
  cfg = c.override(c.Config(), {**TINY, "data.path": corpus, **updates})
  data = pipeline.load_corpus(cfg.data, workdir)  # writes the vocabularies
  c.save_json(cfg, os.path.join(workdir, "config.json"))
  tx, _ = optim.make_optimizer(cfg.optim, 10)
  state = train.init_state(cfg, tx, len(data.src_vocab), len(data.tgt_vocab))
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, 0, state, {"epoch": 0, "index": 0, "seed": cfg.train.seed})
  mngr.wait_until_finished()
  return cfg


# ------------------------------------------------------------------------------------ PCA

def test_pca_matches_the_covariance_eigenvectors_and_is_deterministic():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
  y, comps, ratio = pca.pca_2d(x)
  assert y.shape == (9, 2) and comps.shape == (2, 6)
  xc = x - x.mean(axis=0)
  evals, evecs = np.linalg.eigh(xc.T @ xc)
  top = evecs[:, ::-1][:, :2].T
  for k in range(2):  # same axes up to sign; sign rule: the largest loading is positive
    np.testing.assert_allclose(abs(comps[k] @ top[k]), 1.0, atol=1e-10)
    assert comps[k][np.argmax(np.abs(comps[k]))] > 0
  np.testing.assert_allclose(ratio, evals[::-1][:2] / evals.sum(), rtol=1e-10)
  np.testing.assert_allclose(y, xc @ comps.T)
  y2, comps2, _ = pca.pca_2d(-x)  # flipping the data must not flip the picture's axes' rule
  assert all(c2[np.argmax(np.abs(c2))] > 0 for c2 in comps2)
  np.testing.assert_array_equal(pca.pca_2d(x)[0], y)


def test_pca_of_rank_two_data_keeps_every_distance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 2)) @ rng.normal(size=(2, 5)) + rng.normal(size=5)
  y, _, ratio = pca.pca_2d(x)
  d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)
  np.testing.assert_allclose(d(y), d(x), atol=1e-9)
  np.testing.assert_allclose(ratio.sum(), 1.0)


def test_pair_distances_by_kind_on_hand_made_points():
  x = np.array([[0.0, 0], [0, 1], [3, 0], [3, 1], [10, 10]])
  kinds = ["base", "voice", "order", "order_voice"]
  phrases = ([{"text": k, "group": "g", "kind": k} for k in kinds]
             + [{"text": "e", "group": "", "kind": ""}])
  d = pca.pair_distances(x, phrases)
  assert d["voice"] == {"mean": 1.0, "count": 2}  # base-voice, order-order_voice
  assert d["order"] == {"mean": 3.0, "count": 2}  # base-order, voice-order_voice
  assert d["order+voice"]["count"] == 2
  np.testing.assert_allclose(d["order+voice"]["mean"], np.sqrt(10))
  assert d["other_groups"]["count"] == 4
  np.testing.assert_allclose(d["other_groups"]["mean"],
                             np.mean(np.linalg.norm(x[:4] - x[4], axis=1)))
  alld = [np.linalg.norm(x[i] - x[j]) for i in range(5) for j in range(i + 1, 5)]
  assert d["all_pairs"]["count"] == 10
  np.testing.assert_allclose(d["all_pairs"]["mean"], np.mean(alld))
  # phrases of different groups are never pairs; an unknown kind is named
  assert pca.pair_kind({"text": "a", "group": "1", "kind": "base"},
                       {"text": "b", "group": "2", "kind": "voice"}) is None
  with pytest.raises(ValueError, match="phrase 'b': kind must be one of"):
    pca.pair_kind({"text": "a", "group": "1", "kind": "base"},
                  {"text": "b", "group": "1", "kind": "x"})


def test_the_embedded_phrases_form_voice_and_order_pairs():
  phrases = pca.load_phrases(None, "en")
  groups = {p["group"] for p in phrases}
  counts = {}
  for i in range(len(phrases)):
    for j in range(i + 1, len(phrases)):
      k = pca.pair_kind(phrases[i], phrases[j])
      counts[k] = counts.get(k, 0) + 1
  assert len(groups) >= 4
  assert counts["voice"] == counts["order"] == counts["order+voice"] == 2 * len(groups)
  assert any(p["text"] == "Mary admires John." and p["kind"] == "order" for p in phrases)


def test_encoder_states_are_the_models_final_state_whatever_the_batch():
  cfg = c.override(c.Config(), {**TINY, "data.path": "unread", "data.reverse_source": "true"})
  vocab = Vocab(["<pad>", "<unk>", "<s>", "</s>", "john", "admires", "mary", "sees"])
  params = model.init_params(jax.random.PRNGKey(3), cfg.model, len(vocab), 9)
  m = translate.Loaded(cfg, params, vocab, vocab, [0], "")
  phrases = ["john admires mary", "mary admires john", "john sees", "mary sees john ."]
  states = pca.encoder_states(m, phrases, "all")
  h, e = cfg.model.num_layers, cfg.model.hidden_size
  assert states.shape == (4, 2 * h * e)
  top = pca.encoder_states(m, phrases, "top")
  for i in (0, 2):  # alone, unpadded, reversed by hand
    ids = vocab.encode(phrases[i].split())[::-1]
    st = model.encode(params, np.array([ids], np.int32), cfg.model)
    want = np.concatenate([np.asarray(a)[layer, 0] for layer in range(h)
                           for a in (st.h_LxBxH, st.c_LxBxH)])
    np.testing.assert_allclose(states[i], want, atol=1e-6)
    np.testing.assert_allclose(top[i], np.concatenate([np.asarray(st.h_LxBxH)[-1, 0],
                                                       np.asarray(st.c_LxBxH)[-1, 0]]), atol=1e-6)
  np.testing.assert_allclose(pca.encoder_states(m, phrases, "top_h"),
                             states[:, (h - 1) * 2 * e:(h - 1) * 2 * e + e])
  assert not np.allclose(states[0], states[1])  # word order changes the state
  with pytest.raises(ValueError, match=r"phrase 2 \(''\) has no tokens"):
    pca.encoder_states(m, ["john", ""], "all")


def test_phrase_files_in_each_format(tmp_path):
  js = tmp_path / "p.json"
  js.write_text(json.dumps([{"en": "a b", "fr": "x", "group": "1", "kind": "order"},
                            {"text": "c"}]))
  assert pca.load_phrases(str(js), "en") == [{"text": "a b", "group": "1", "kind": "order"},
                                            {"text": "c", "group": "", "kind": ""}]
  tsv = tmp_path / "p.txt"
  tsv.write_text("g\tvoice\tI gave her a card\nplain phrase\n\n")
  assert pca.load_phrases(str(tsv), "en") == [
      {"text": "I gave her a card", "group": "g", "kind": "voice"},
      {"text": "plain phrase", "group": "", "kind": ""}]
  tsv.write_text("ok\na\tb\n")
  with pytest.raises(ValueError, match=r"p.txt: line 2: expected a phrase"):
    pca.load_phrases(str(tsv), "en")
  js.write_text("[{\"fr\": 1}]")
  with pytest.raises(ValueError, match=r"entry 1: needs a string field 'en'"):
    pca.load_phrases(str(js), "en")


# ------------------------------------------------------------------------ length and rarity

def test_quantile_edges_and_bins_on_hand_made_lengths():
  lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # sorted: 1 1 2 3 3 4 5 5 6 9
  edges = by_length.quantile_edges(lengths, 5)  # positions 2, 4, 6, 8, 10 of the sorted list
  assert edges == [1, 3, 4, 5, 9]
  bins = by_length.assign_bins(lengths, edges)
  assert bins == [[1, 3], [0, 6, 9], [2], [4, 8], [5, 7]]
  assert by_length.bin_labels(edges, len(bins)) == ["<=1", "2-3", "4", "5", "6-9"]
  # repeated values collapse edges; values past the last explicit edge get their own bin
  assert by_length.quantile_edges([2, 2, 2, 2, 7], 4) == [2, 7]
  assert by_length.assign_bins([1, 5, 8, 30], [4, 7]) == [[0], [1], [2, 3]]
  assert by_length.bin_labels([4, 7], 3) == ["<=4", "5-7", ">7"]
  assert by_length.assign_bins([1, 2], [4, 7, 12]) == [[0, 1], [], []]
  with pytest.raises(ValueError, match="strictly increasing"):
    by_length.assign_bins([1], [4, 4])


def test_word_ranks_and_average_rank():
  sents = [["the", "cat"], ["the", "dog"], ["the", "cat", "sat"]]
  ranks = by_length.word_ranks(sents)
  assert ranks == {"the": 1, "cat": 2, "dog": 3, "sat": 4}  # ties broken by spelling
  assert by_length.average_rank(["the", "dog"], ranks) == 2.0
  assert by_length.average_rank(["cat", "zebra"], ranks) == (2 + 5) / 2  # unseen: after the last
  vocab = Vocab(["<pad>", "<unk>", "<s>", "</s>", "the", "cat"])
  assert by_length.vocab_ranks(vocab) == {"the": 1, "cat": 2}


def test_bleu_by_bin_is_corpus_bleu_inside_each_bin():
  score = lambda h, r: bleu.score_translations(h, r, "none", "fr")
  refs = ["a b c d", "e f g h i", "j k l m", "n o p q r s", "t u v w"]
  hyps = [r.split() for r in refs[:3]] + [["n", "o", "x", "q", "r", "s"], ["z", "z"]]
  src = [["w"] * n for n in (2, 2, 5, 5, 5)]
  ranks = {"w": 1}
  result = by_length.analyse(src, hyps, refs, ranks, score, num_bins=2)
  bins = result["length"]["bins"]
  assert [b["count"] for b in bins] == [2, 3] and result["length"]["edges"] == [2, 5]
  assert bins[0]["bleu"] == pytest.approx(100.0) and bins[0]["label"] == "<=2"
  want = sacrebleu.corpus_bleu([" ".join(h) for h in hyps[2:]], [refs[2:]]).score
  assert bins[1]["bleu"] == pytest.approx(want) and 0 < want < 100
  assert bins[1]["mean"] == 5 and bins[1]["min"] == 5
  rar = result["rarity"]["bins"]  # every word has rank 1: a single group of all 5
  assert [b["count"] for b in rar] == [5]
  assert rar[0]["bleu"] == pytest.approx(sacrebleu.corpus_bleu([" ".join(h) for h in hyps],
                                                               [refs]).score)
  assert result["overall"]["bleu"] == pytest.approx(rar[0]["bleu"])


def test_longest_picks_longest_first_and_earlier_on_ties():
  assert long_examples.longest([3, 9, 4, 9, 1], 3) == [1, 3, 2]
  assert long_examples.longest([2], 5) == [0]
  md = long_examples.markdown([{"length": 3, "source": "a | b", "translation": "x",
                                "reference": "y", "sentence_bleu": 12.345}], "T")
  assert "| 1 | 3 | a \\| b | x | y | 12.3 |" in md


# ------------------------------------------------------------------------ command lines

def test_the_three_commands_on_a_tiny_model(toy_corpus, tmp_path, capsys):
  work, out = str(tmp_path / "w"), str(tmp_path / "out")
  make_workdir(toy_corpus, work)
  phrases = tmp_path / "ph.txt"
  phrases.write_text("1\tbase\tw1 w2 w3\n1\torder\tw3 w2 w1\n1\tvoice\tw4 w5 w1\nw5 w4 w6\n")
  assert pca.main(["--workdir", work, "--phrases", str(phrases), "--out", out]) == 0
  res = json.load(open(os.path.join(out, "pca.json")))
  assert os.path.getsize(os.path.join(out, "pca.png")) > 1000
  assert len(res["points"]) == 4 and res["state_size"] == 2 * 2 * 12 and res["step"] == 0
  full = res["distances"]["full"]
  assert full["order"]["count"] == full["voice"]["count"] == full["order+voice"]["count"] == 1
  assert full["other_groups"]["count"] == 3 and full["all_pairs"]["count"] == 6
  assert "mean distance, full: all_pairs" in capsys.readouterr().out

  assert by_length.main(["--workdir", work, "--split", "test", "--max_sentences", "24",
                         "--num_bins", "3", "--out", out, "--beam_size", "1"]) == 0
  res = json.load(open(os.path.join(out, "by_length.json")))
  assert res["num_sentences"] == 24 and res["beam_size"] == 1
  for name in ("length", "rarity"):
    assert sum(b["count"] for b in res[name]["bins"]) == 24
  for png in ("by_length.png", "by_rarity.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000

  assert long_examples.main(["--workdir", work, "--split", "test", "--num", "3", "--out", out]) == 0
  rows = json.load(open(os.path.join(out, "table3.json")))["rows"]
  assert [r["length"] for r in rows] == sorted([r["length"] for r in rows], reverse=True)
  assert rows[0]["length"] == 6 and len(rows) == 3
  assert open(os.path.join(out, "table3.md")).read().count("\n| ") == 4  # header + 3 rows

  assert by_length.main(["--workdir", work, "--src", str(phrases)]) == 1
  assert "--src and --ref go together" in capsys.readouterr().err


def test_curves_read_every_series_skip_a_torn_line_and_draw(tmp_path, caplog, capsys):
  from s2s_jax.analysis import curves
  run = tmp_path / "run"
  run.mkdir()
  lines = [{"kind": "valid", "step": 0, "valid_ppl": 900.0},
           {"kind": "train", "step": 50, "train_ppl": 40.0, "lr": 0.7},
           {"kind": "train", "step": 100, "train_ppl": 20.0, "lr": 0.35},
           {"kind": "valid", "step": 100, "valid_ppl": 25.0}]
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"kind": "tra')
  s = curves.read_series(str(run))
  assert s == {"train_ppl": [[50, 40.0], [100, 20.0]], "lr": [[50, 0.7], [100, 0.35]],
               "valid_ppl": [[0, 900.0], [100, 25.0]]}
  assert "line 5: not JSON" in caplog.text
  out = tmp_path / "out"
  curves.curves([str(run), str(run)], ["a", "b"], str(out))
  assert (out / "curves.png").stat().st_size > 1000
  assert (json.loads((out / "curves.json").read_text())["b"]["valid_ppl"]
          == [[0, 900.0], [100, 25.0]])
  with pytest.raises(ValueError, match="2 names for 1"):
    curves.curves([str(run)], ["a", "b"], str(out))
  assert curves.main(["--workdir", str(tmp_path / "missing")]) == 1  # cli.run's policy
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and err[-1].endswith(
      f"not found (is {tmp_path / 'missing'} a training WORKDIR?)")
