"""The command lines with attention models: unknown-word replacement, --align, the attention
picture, ensembles of different members, and checkpoint averaging."""

import json
import os

import jax
import numpy as np
import pytest
from test_decode_cli import TINY, read, run, write

from s2s_jax import average, checkpoint, decode, evaluate, rescore, train, translate
from s2s_jax import config as c
from s2s_jax.analysis import attention
from s2s_jax.data.vocab import UNK, UNK_ID, Vocab

ATTENTION = {**TINY, "model.attention": "general", "model.input_feeding": True,
             "data.tgt_vocab_size": 8, "train.checkpoint_every": 60}  # 4 of 12 words unknown
INPUT = ["w1 w2 w3", "", "w9 w10 w11 w4", "w5"]


@pytest.fixture(scope="module")
def workdirs(toy_corpus, tmp_path_factory):
  """{"att": an attention model (checkpoints at steps 60 and 120), "plain": a paper model}."""
  root = tmp_path_factory.mktemp("attention_cli")
  out = {}
  for name, updates in (("att", ATTENTION), ("plain", {**TINY, "data.tgt_vocab_size": 8})):
    out[name] = str(root / name)
    train.train(c.override(c.Config(), {**updates, "data.path": toy_corpus}), out[name],
                progress=False)
  return out


def test_replace_unk_on_a_hand_made_case():
  """<unk> -> the source word of highest weight, positions counted in the order the encoder
  read the source (reversed: last word first), through the dictionary where it has the word."""
  vocab = Vocab(["<pad>", "<unk>", "<s>", "</s>", "la", "maison"])
  cfg = c.override(c.Config(), {"data.reverse_source": True})
  m = translate.Loaded(cfg, None, vocab, vocab, [0], "")
  src = ["the", "Smith", "house", "in", "Oslo"]  # as written; the encoder read Oslo first
  weights = np.array([[0.1, 0.1, 0.2, 0.5, 0.1],   # la     -> (not replaced)
                      [0.0, 0.1, 0.1, 0.7, 0.1],   # <unk>  -> encoder position 3 = "Smith"
                      [0.1, 0.1, 0.6, 0.1, 0.1],   # maison
                      [0.8, 0.1, 0.0, 0.1, 0.0]])  # <unk>  -> encoder position 0 = "Oslo"
  h = decode.Translation([4, UNK_ID, 5, UNK_ID], -3.0, -3.0, weights)
  assert translate.output_words(m, h, src) == ["la", UNK, "maison", UNK]
  assert translate.output_words(m, h, src, {}) == ["la", "Smith", "maison", "Oslo"]
  assert translate.output_words(m, h, src, {"Oslo": "Oslo-FR", "the": "le"}) == [
      "la", "Smith", "maison", "Oslo-FR"]
  assert translate.aligned_sources(m, h) == [1, 1, 2, 4]
  forward = m._replace(cfg=c.override(cfg, {"data.reverse_source": False}))
  assert translate.output_words(forward, h, src, {}) == ["la", "in", "maison", "the"]


def test_translate_replace_unk_and_align(workdirs, tmp_path, capsys):
  src = write(tmp_path / "in.txt", INPUT)
  wd = workdirs["att"]
  rc, plain, err = run(translate, ["--workdir", wd, "--input", src], capsys)
  assert rc == 0, err
  assert UNK in plain  # words outside the 8-word target vocabulary come out as <unk>
  unk_dict = write(tmp_path / "dict.txt", [f"w{i} F{i}" for i in range(12)])
  rc, replaced, err = run(translate, ["--workdir", wd, "--input", src, "--replace_unk",
                                      "--unk_dict", unk_dict], capsys)
  assert rc == 0, err
  rc, aligned, err = run(translate, ["--workdir", wd, "--input", src, "--align"], capsys)
  assert rc == 0, err
  plain, replaced, aligned = (x.split("\n")[:-1] for x in (plain, replaced, aligned))
  assert len(plain) == len(replaced) == len(aligned) == len(INPUT) and aligned[1] == ""
  for line, before, after, al in zip(INPUT, plain, replaced, aligned):
    words = line.split()
    tokens, pairs = al.split(" ||| ") if al else ("", "")
    assert tokens == before
    links = [tuple(map(int, p.split("-"))) for p in pairs.split()]
    assert [j for _, j in links] == list(range(len(before.split())))
    assert all(0 <= i < len(words) for i, _ in links)
    # each <unk> became the dictionary entry of the source word it is aligned to
    want = [f"F{words[i][1:]}" if w == UNK else w for (i, _), w in zip(links, before.split())]
    assert after.split() == want
  assert UNK not in "\n".join(replaced)
  rc, _, err = run(translate, ["--workdir", wd, "--input", src, "--unk_dict", unk_dict], capsys)
  assert rc == 2 and "--unk_dict is the dictionary of --replace_unk" in err
  rc, _, err = run(translate, ["--workdir", workdirs["plain"], "--input", src, "--align"], capsys)
  assert rc == 1 and "need a model trained with model.attention" in err


def test_evaluate_replace_unk(workdirs, tmp_path, capsys):
  wd = workdirs["att"]
  rc, out, err = run(evaluate, ["--workdir", wd, "--split", "test"], capsys)
  plain = json.loads(out)
  unk_dict = write(tmp_path / "dict.txt", [f"w{i} f{i}" for i in range(12)])  # the toy "lexicon"
  rc, out, err = run(evaluate, ["--workdir", wd, "--split", "test", "--replace_unk",
                                "--unk_dict", unk_dict], capsys)
  assert rc == 0, err
  replaced = json.loads(out)
  assert replaced["replace_unk"] and not plain["replace_unk"]
  assert replaced["results_file"].endswith("eval_test_replace_unk.json")
  assert replaced["perplexity"] == plain["perplexity"]
  # an <unk> never matches a reference word; its replacement may: BLEU can only rise
  assert replaced["bleu_tok"] > plain["bleu_tok"], (plain["bleu_tok"], replaced["bleu_tok"])


def test_attention_picture(workdirs, tmp_path, capsys):
  rc, out, err = run(attention, ["--workdir", workdirs["att"], "--sentence", "w1 w2 w3",
                                 "--out", tmp_path], capsys)
  assert rc == 0, err
  with open(tmp_path / "attention.json") as f:
    result = json.load(f)
  assert result["source"] == ["w1", "w2", "w3"]
  weights = np.array(result["weights"])
  assert weights.shape == (len(result["output"]), 3)
  np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
  assert result["alignment"] == [int(i) for i in np.argmax(weights, axis=1)]  # as written
  assert out.split("\n")[0] == " ".join(result["output"])
  assert os.path.getsize(tmp_path / "attention.png") > 1000


def test_ensemble_of_different_members_translates_and_rescores(workdirs, tmp_path, capsys):
  src = write(tmp_path / "in.txt", INPUT)
  m = translate.load([workdirs["att"], workdirs["plain"]])
  assert isinstance(m.params, tuple) and m.model_cfg[1].attention == "none"
  rc, out, err = run(translate, ["--workdir", workdirs["att"], "--ensemble", workdirs["plain"],
                                 "--input", src, "--replace_unk"], capsys)
  assert rc == 0 and "loaded 2 model(s)" in err
  assert len(out.split("\n")) == len(INPUT) + 1
  nbest = write(tmp_path / "list.nbest", ["0 ||| f1 f2 f3 ||| d= -1 ||| -2.0",
                                          "2 ||| f4 ||| d= -1 ||| -1.0"])
  rc, out, err = run(rescore, ["--workdir", workdirs["att"], "--ensemble", workdirs["plain"],
                               "--src", src, "--nbest", nbest], capsys)
  assert rc == 0, err
  lines = read(json.loads(out)["output_nbest"])
  lstm = [float(line.split("lstm= ")[1].split()[0]) for line in lines]
  ids = translate.encode_sources(m, INPUT)
  want = decode.score_ids(m.params, m.model_cfg, [(ids[0], m.tgt_vocab.encode(["f1", "f2", "f3"])),
                                                  (ids[2], m.tgt_vocab.encode(["f4"]))])
  np.testing.assert_allclose(lstm, want, atol=1e-5)


def test_average_of_two_checkpoints_is_their_mean(workdirs, tmp_path, capsys):
  wd, out = workdirs["att"], str(tmp_path / "avg")
  rc, stdout, err = run(average, ["--workdir", wd, "--last", 2, "--out", out], capsys)
  assert rc == 0, err
  assert json.loads(stdout)["steps"] == [60, 120]
  cfg, params, src_vocab, tgt_vocab, step = checkpoint.load_model(out)
  assert step == 120 and cfg == c.load_json(os.path.join(wd, "config.json"))
  like = jax.eval_shape(lambda: params)
  a, b = (jax.device_get(checkpoint.restore_params(wd, like, s)[0]) for s in (60, 120))
  jax.tree_util.tree_map(lambda m, x, y: np.testing.assert_allclose(m, (x + y) / 2, rtol=1e-6,
                                                                    atol=1e-7),
                         jax.device_get(params), a, b)
  assert not np.allclose(a["attention"]["w_c"], b["attention"]["w_c"])
  # every command reads it
  src = write(tmp_path / "in.txt", INPUT)
  rc, _, err = run(translate, ["--workdir", out, "--input", src, "--replace_unk"], capsys)
  assert rc == 0, err
  rc, _, err = run(evaluate, ["--workdir", out, "--split", "test", "--beam_size", 1], capsys)
  assert rc == 0 and os.path.exists(os.path.join(out, "eval_test.json"))
  # refused: too few checkpoints, an existing average
  rc, _, err = run(average, ["--workdir", wd, "--last", 3, "--out", tmp_path / "x"], capsys)
  assert rc == 1 and "2 checkpoint(s) (steps [60, 120]), fewer than --last 3" in err
  rc, _, err = run(average, ["--workdir", wd, "--last", 1, "--out", out], capsys)
  assert rc == 1 and "holds checkpoints already" in err
