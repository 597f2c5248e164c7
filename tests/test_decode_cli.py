"""The decoding command lines on a tiny trained WORKDIR: translate, evaluate, rescore."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from s2s_jax import bleu, decode, evaluate, rescore, train, translate
from s2s_jax import config as c

TINY = {"data.source": "text", "data.tokenizer": "none", "model.num_layers": 1,
        "model.hidden_size": 16, "model.embed_size": 8, "train.batch_size": 16,
        "train.num_steps": 120, "optim.name": "adam", "optim.learning_rate": 0.02,
        "optim.schedule": "constant", "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.log_every": 20, "decode.beam_size": 3, "decode.batch_size": 8,
        "data.bucket_width": 8, "data.bucket_growth": 0.0}


@pytest.fixture(scope="module")
def workdir(toy_corpus, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("decode_cli") / "wd")
  train.train(c.override(c.Config(), {**TINY, "data.path": toy_corpus}), wd, progress=False)
  return wd


def write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  return str(path)


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read().split("\n")[:-1]


def run(module, args, capsys):
  """Runs a CLI's main in this process: (exit code, stdout, stderr)."""
  rc = module.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, err


INPUT = ["w1 w2 w3", "", "w4", "   ", "w1 w2 w3", "w5 w6 w7 w8 w9 w10", "w3 w3"]


def test_translate_keeps_lines_and_order(workdir, tmp_path, capsys):
  long_line = " ".join(f"w{i % 12}" for i in range(30))
  src = write(tmp_path / "in.txt", INPUT + [long_line])
  out = tmp_path / "out.txt"
  rc, _, err = run(translate, ["--workdir", workdir, "--input", src, "--output", out,
                               "--max_input_len", 12], capsys)
  assert rc == 0, err
  lines = read(out)
  assert len(lines) == len(INPUT) + 1
  assert lines[1] == "" and lines[3] == ""
  assert all(lines[i] for i in (0, 4, 5, 7))  # the model has learned to emit words
  assert lines[0] == lines[4]  # the same sentence, wherever it is
  assert "line 8: 30 source tokens; truncated to the first 12" in err
  # the truncated line translates like its first 12 words
  first12 = write(tmp_path / "first12.txt", [" ".join(long_line.split()[:12])])
  rc, stdout, _ = run(translate, ["--workdir", workdir, "--input", first12], capsys)
  assert rc == 0 and stdout.split("\n")[0] == lines[7]


def test_translate_stdin_to_stdout_subprocess(workdir):
  proc = subprocess.run([sys.executable, "-m", "s2s_jax.translate", "--workdir", workdir,
                         "--beam_size", "1"], input="w1 w2\n\nw3 w4 w5\n", capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.split("\n")
  assert len(lines) == 4 and lines[1] == "" and lines[3] == "" and lines[0] and lines[2]


def test_translate_nbest_output(workdir, tmp_path, capsys):
  src = write(tmp_path / "in.txt", INPUT)
  rc, stdout, err = run(translate, ["--workdir", workdir, "--input", src, "--nbest", 3], capsys)
  assert rc == 0, err
  rows = [line.split(" ||| ") for line in stdout.strip("\n").split("\n")]
  ids = [int(r[0]) for r in rows]
  assert ids == sorted(ids) and set(ids) == set(range(len(INPUT)))
  for i, line in enumerate(INPUT):
    mine = [r for r in rows if int(r[0]) == i]
    assert len(mine) == (3 if line.strip() else 1)
    scores = [float(r[3]) for r in mine]
    assert scores == sorted(scores, reverse=True)
    for r in mine:  # features: logp= L len= n; without a length penalty score == logp
      feats = r[2].split()
      assert feats[0] == "logp=" and float(feats[1]) == pytest.approx(float(r[3]), abs=1e-5)
      assert int(feats[3]) == (len(r[1].split()) + 1 if line.strip() else 1)
  one_best = run(translate, ["--workdir", workdir, "--input", src], capsys)[1].split("\n")
  assert [r[1] for r in rows if r is next(x for x in rows if x[0] == r[0])] == one_best[:-1]


def test_ensemble_flags(workdir, tmp_path, capsys):
  src = write(tmp_path / "in.txt", INPUT)
  single = run(translate, ["--workdir", workdir, "--input", src], capsys)[1]
  rc, double, err = run(translate, ["--workdir", workdir, "--input", src, "--ensemble", workdir],
                        capsys)
  assert rc == 0, err
  assert double == single and "loaded 2 model(s)" in err
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  with open(os.path.join(other, "vocab.tgt.txt"), encoding="utf-8") as f:
    tokens = f.read().split("\n")
  tokens[4], tokens[5] = tokens[5], tokens[4]
  write(os.path.join(other, "vocab.tgt.txt"), tokens[:-1])
  rc, _, err = run(translate, ["--workdir", workdir, "--input", src, "--ensemble", other], capsys)
  assert rc == 1 and "target vocabulary differs" in err and len(err.strip().split("\n")) == 1


def test_translate_errors(workdir, tmp_path, capsys):
  empty = str(tmp_path / "no_ckpt")
  os.makedirs(empty)
  for name in ("config.json", "vocab.src.txt", "vocab.tgt.txt"):
    shutil.copy(os.path.join(workdir, name), empty)
  src = write(tmp_path / "in.txt", ["w1"])
  cases = [(["--workdir", empty, "--input", src], "no checkpoint found", 1),
           (["--workdir", str(tmp_path / "nowhere"), "--input", src], "config.json: not found", 1),
           (["--workdir", workdir, "--input", str(tmp_path / "missing.txt")],
            "missing.txt: file not found", 1),
           (["--workdir", workdir, "--input", src, "--nbest", 5], "bad value 5 for decode.nbest: "
            "allowed: an integer from 1 to decode.beam_size; decode.beam_size is 3", 2),
           (["--workdir", workdir, "--input", src, "--beam_size", "two"],
            "bad value 'two' for decode.beam_size", 2)]
  for args, message, status in cases:  # status 2: a config value (cli.run's policy)
    rc, _, err = run(translate, args, capsys)
    assert rc == status and message in err, (args, err)
    assert err.strip().split("\n")[-1].startswith("error: ")
    assert "Traceback" not in err


def test_evaluate_files_and_split(workdir, toy_corpus, tmp_path, capsys):
  src, ref = os.path.join(toy_corpus, "test.en"), os.path.join(toy_corpus, "test.fr")
  out = tmp_path / "hyp.txt"
  rc, stdout, err = run(evaluate, ["--workdir", workdir, "--src", src, "--ref", ref,
                                   "--output", out], capsys)
  assert rc == 0, err
  res = json.loads(stdout)
  assert res.pop("results_file") == os.path.join(workdir, "eval_test.en.json")
  with open(os.path.join(workdir, "eval_test.en.json")) as f:
    assert json.load(f) == res
  hyps, refs = read(out), read(ref)
  assert len(hyps) == len(refs) == res["sentences"]
  again = bleu.compute(hyps, refs, hyps, refs)  # data.tokenizer=none: the text is the tokens
  assert res["bleu"] == pytest.approx(again["bleu"])
  assert res["bleu_tok"] == pytest.approx(again["bleu_tok"])
  assert 1.0 < res["perplexity"] < 40.0 and res["beam_size"] == 3
  # the configured split gives the same figures as its files, reading that split alone: a
  # corpus folder with only the test files will do
  only_test, alone = tmp_path / "only_test", str(tmp_path / "alone")
  only_test.mkdir()
  for name in ("test.en", "test.fr"):
    shutil.copy(os.path.join(toy_corpus, name), only_test)
  shutil.copytree(workdir, alone)
  config_path = os.path.join(alone, "config.json")
  c.save_json(c.override(c.load_json(config_path), {"data.path": str(only_test)}), config_path)
  rc, stdout, err = run(evaluate, ["--workdir", alone, "--split", "test"], capsys)
  assert rc == 0, err
  split = json.loads(stdout)
  for key in ("bleu", "bleu_tok", "perplexity", "sentences"):
    assert split[key] == pytest.approx(res[key], rel=1e-6)
  # perplexity of the validation split = the one training logged at its last step
  rc, stdout, err = run(evaluate, ["--workdir", workdir, "--split", "valid"], capsys)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if '"valid"' in line][-1]["valid_ppl"]
  assert json.loads(stdout)["perplexity"] == pytest.approx(logged, rel=1e-4)
  rc, _, err = run(evaluate, ["--workdir", workdir, "--split", "nope"], capsys)
  assert rc == 1 and "no split 'nope'" in err


def test_rescore(workdir, tmp_path, capsys):
  srcs = ["w1 w2 w3", "w4 w5", "w6"]
  src = write(tmp_path / "src.txt", srcs)
  nbest_lines = ["0 ||| f1 f2 f3 ||| d= -1 lm= -2 ||| -10.5",
                 "0 ||| f1 f1 ||| d= -1 lm= -3 ||| -9.0",
                 "0 ||| f7 f8 f9 f10 ||| d= 0 ||| -20.0",
                 "1 ||| f4 f5 ||| d= -1 ||| -8.0",
                 "1 ||| f5 f4 ||| d= -2 ||| -7.5"]
  nbest = write(tmp_path / "list.nbest", nbest_lines)
  ref = write(tmp_path / "ref.txt", ["f1 f2 f3", "f4 f5", "f6"])
  rc, stdout, err = run(rescore, ["--workdir", workdir, "--src", src, "--nbest", nbest,
                                  "--ref", ref], capsys)
  assert rc == 0, err
  res = json.loads(stdout)
  # the LSTM scores, independently: decode.score_ids on the same ids
  m = translate.load([workdir])
  src_ids = translate.encode_sources(m, srcs)
  entries = [line.split(" ||| ") for line in nbest_lines]
  lstm = decode.score_ids(m.params, m.cfg.model, [
      (src_ids[int(e[0])], m.tgt_vocab.encode(e[1].split())) for e in entries])
  combined = [0.5 * float(e[3]) + 0.5 * lp for e, lp in zip(entries, lstm)]
  out = [line.split(" ||| ") for line in read(res["output_nbest"])]
  assert len(out) == len(entries)
  for row in out:
    k = next(i for i, e in enumerate(entries) if e[0] == row[0] and e[1] == row[1])
    assert float(row[3]) == pytest.approx(combined[k], abs=1e-4)
    assert row[2].startswith(entries[k][2])
    assert float(row[2].split("lstm=")[1]) == pytest.approx(lstm[k], abs=1e-4)
  for i in ("0", "1"):
    scores = [float(r[3]) for r in out if r[0] == i]
    assert scores == sorted(scores, reverse=True)
  best = read(res["output"])
  assert len(best) == 3 and best[2] == ""  # sentence 2 has no entries
  for i in (0, 1):
    mine = [k for k, e in enumerate(entries) if int(e[0]) == i]
    assert best[i] == entries[max(mine, key=lambda k: combined[k])][1]
  refs = read(ref)
  for key, hyps in (("baseline", ["f1 f1", "f5 f4", ""]), ("rescored", best)):
    want = bleu.score_translations([h.split() for h in hyps], refs, "none", "fr")
    assert res[key]["bleu"] == pytest.approx(want["bleu"])
    assert res[key]["bleu_tok"] == pytest.approx(want["bleu_tok"])
  # weight 1: the LSTM alone decides; weight 0: the original scores
  rc, stdout, _ = run(rescore, ["--workdir", workdir, "--src", src, "--nbest", nbest, "--weight", 1,
                                "--output", tmp_path / "w1.txt"], capsys)
  for i in (0, 1):
    mine = [k for k, e in enumerate(entries) if int(e[0]) == i]
    assert read(tmp_path / "w1.txt")[i] == entries[max(mine, key=lambda k: lstm[k])][1]
  run(rescore, ["--workdir", workdir, "--src", src, "--nbest", nbest, "--weight", 0,
                "--output", tmp_path / "w0.txt"], capsys)
  assert read(tmp_path / "w0.txt") == ["f1 f1", "f5 f4", ""]


@pytest.mark.parametrize("line,message", [
    ("0 ||| f1 ||| d= 1", "line 2: expected 'id ||| hypothesis ||| features ||| score'"),
    ("x ||| f1 ||| d= 1 ||| -1", "line 2: sentence id 'x' is not an integer"),
    ("5 ||| f1 ||| d= 1 ||| -1", "line 2: sentence id 5 is outside 0..1"),
    ("1 ||| f1 ||| d= 1 ||| high", "line 2: score 'high' is not a number"),
])
def test_rescore_malformed_lines(workdir, tmp_path, capsys, line, message):
  src = write(tmp_path / "src.txt", ["w1", "w2"])
  nbest = write(tmp_path / "bad.nbest", ["0 ||| f1 ||| d= 1 ||| -1", line])
  rc, _, err = run(rescore, ["--workdir", workdir, "--src", src, "--nbest", nbest], capsys)
  assert rc == 1 and f"{nbest}: {message}" in err and "Traceback" not in err
