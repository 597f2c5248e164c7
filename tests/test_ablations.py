"""The Table 1 runner: its plan, skipping finished work, resuming, findings, default evaluation."""

import json
import os

import numpy as np
import pytest
from test_analysis import make_workdir

from experiments import ablations
from s2s_jax import config as c
from s2s_jax import evaluate, translate


def base_config(**updates):
  return c.override(c.Config(), {"model.num_layers": 2, "data.source": "text",
                                 "data.path": "/nowhere", **updates})


class FakeLab:
  """Fake train/evaluate functions with a made-up quality per model, recording every call."""

  def __init__(self, interrupt=()):
    self.trained, self.evaluated, self.interrupt = [], [], set(interrupt)

  def train(self, cfg, workdir):
    name = os.path.basename(workdir)
    self.trained.append(name)
    if name in self.interrupt:
      self.interrupt.discard(name)  # interrupted once; the rerun finishes it
      return {"step": 3, "interrupted": True}
    return {"step": 10, "valid_ppl": 2.0, "interrupted": False}

  def evaluate(self, workdirs, beam, split, max_sentences):
    names = [os.path.basename(w) for w in workdirs]
    self.evaluated.append((tuple(names), beam))
    # quality: reversed > forward, deeper > shallower, wider beam and more members better
    q = []
    for n in names:
      direction, layers, seed = n.split("-")
      q.append((10 if direction == "reversed" else 0) + 3 * int(layers[1:]) - 0.1 * int(seed[4:]))
    score = max(q) + 2 * (len(q) - 1) + {1: 0, 2: 0.5, 12: 0.7}[beam]
    return {"bleu": score, "bleu_tok": score + 1, "test_ppl": 50.0 / score, "signature": "fake",
            "decode_wps": 100.0, "sentences": 7, "in_length_ppl": None, "in_length_sentences": 7}


def test_plan_has_the_papers_rows():
  models, rows = ablations.plan(base_config())
  assert list(models) == ["reversed-L2-seed0", "forward-L2-seed0", "reversed-L1-seed0",
                          "reversed-L4-seed0"] + [f"reversed-L2-seed{s}" for s in range(1, 5)]
  assert models["forward-L2-seed0"] == {"data.reverse_source": False, "model.num_layers": 2,
                                        "train.seed": 0}
  assert models["reversed-L2-seed3"]["train.seed"] == 3
  assert len(rows) == 14 and len({r.key for r in rows}) == 14
  ens = {(len(r.models), r.beam_size): r.paper_bleu for r in rows if r.group == "ensemble"}
  assert ens == {(5, 1): 33.00, (2, 12): 33.27, (5, 2): 34.50, (5, 12): 34.81}
  beams = sorted(r.beam_size for r in rows if r.models == ("reversed-L2-seed0",))
  assert beams == [1, 2, 12]
  # a 4-layer base (the paper's) trains depths 1 and 2 besides itself; seeds start at train.seed
  models4, _ = ablations.plan(base_config(**{"model.num_layers": 4, "train.seed": 7}))
  assert sorted(models4) == sorted(["reversed-L4-seed7", "forward-L4-seed7", "reversed-L1-seed7",
                                    "reversed-L2-seed7"]
                                   + [f"reversed-L4-seed{s}" for s in range(8, 12)])


def test_work_order_evaluates_each_row_after_its_last_model():
  models, rows = ablations.plan(base_config())
  order = ablations.work_order(models, rows)
  assert sorted(r.key for r in order) == sorted(r.key for r in rows)
  rank = {m: i for i, m in enumerate(models)}
  last = [max(rank[m] for m in r.models) for r in order]
  assert last == sorted(last)
  assert order[0].models == ("reversed-L2-seed0",)


def test_runner_trains_and_evaluates_once_and_skips_finished_work(tmp_path):
  lab = FakeLab()
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert sorted(lab.trained) == sorted(ablations.plan(base_config())[0])
  assert len(lab.evaluated) == 14 and len(set(lab.evaluated)) == 14
  assert not table["interrupted"] and len(table["rows"]) == 14
  md = (tmp_path / "table1.md").read_text()
  assert "pending" not in md and md.count("**reproduced**") == 7 and "not reproduced" not in md
  saved = json.loads((tmp_path / "table1.json").read_text())
  assert saved["rows"] == table["rows"]

  # rerun: nothing to do
  lab2 = FakeLab()
  ablations.run(base_config(), str(tmp_path), train_fn=lab2.train, evaluate_fn=lab2.evaluate)
  assert lab2.trained == [] and lab2.evaluated == []

  # a row removed from the JSON is evaluated again, and only it
  key = "ensemble2-reversed-L2-seed0-beam12"
  del saved["rows"][key]
  (tmp_path / "table1.json").write_text(json.dumps(saved))
  lab3 = FakeLab()
  table3 = ablations.run(base_config(), str(tmp_path), train_fn=lab3.train,
                         evaluate_fn=lab3.evaluate)
  assert lab3.trained == []
  assert lab3.evaluated == [(("reversed-L2-seed0", "reversed-L2-seed1"), 12)]
  assert table3["rows"][key] == table["rows"][key]


def test_interrupted_training_stops_the_runner_and_the_rerun_resumes(tmp_path):
  lab = FakeLab(interrupt=["reversed-L1-seed0"])
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert table["interrupted"]
  assert lab.trained == ["reversed-L2-seed0", "forward-L2-seed0", "reversed-L1-seed0"]
  done = set(json.loads((tmp_path / "table1.json").read_text())["rows"])
  assert done == {"single-reversed-L2-seed0-beam12", "single-reversed-L2-seed0-beam1",
                  "single-reversed-L2-seed0-beam2", "single-forward-L2-seed0-beam12"}
  md = (tmp_path / "table1.md").read_text()
  assert "Depth: pending" in md and "Reversed beats forward" in md
  lab.trained.clear()
  lab.evaluated.clear()
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert not table["interrupted"] and len(table["rows"]) == 14
  assert lab.trained[0] == "reversed-L1-seed0" and len(lab.trained) == 6
  assert len(lab.evaluated) == 10


def test_a_different_config_in_the_same_dir_is_refused(tmp_path):
  lab = FakeLab(interrupt=["reversed-L2-seed0"])
  ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  with pytest.raises(c.ConfigError, match=r"model.hidden_size: 1000 -> 64"):
    ablations.run(base_config(**{"model.hidden_size": 64}), str(tmp_path), train_fn=lab.train,
                  evaluate_fn=lab.evaluate)


def test_findings_report_what_does_not_reproduce(tmp_path):
  lab = FakeLab()
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  _, rows = ablations.plan(base_config())
  bad = json.loads(json.dumps(table))
  fwd, rev = (bad["rows"]["single-forward-L2-seed0-beam12"],
              bad["rows"]["single-reversed-L2-seed0-beam12"])
  fwd["bleu"] = rev["bleu"] + 1  # forward wins on BLEU only
  bad["rows"]["single-reversed-L2-seed0-beam1"]["bleu"] = rev["bleu"] + 0.01  # greedy wins
  found = ablations.findings(bad, rows)
  assert "perplexity **reproduced**, BLEU **not reproduced**" in found[0]
  assert found[2].endswith("**not reproduced**")
  assert "**not reproduced**" not in found[1] + found[3]
  # depth: per-layer perplexity change printed from the numbers (ppl = 50 / score)
  s = {d: 10 + 3 * d + 0.7 for d in (1, 2, 4)}
  assert f"1->2 layers {100 * (s[1] / s[2] - 1):+.1f}%" in found[1]


def test_command_line_refuses_unknown_base_and_fields(tmp_path, capsys):
  assert ablations.main(["--workdir", str(tmp_path), "--base", "nosuch"]) == 2
  assert "no preset experiments/nosuch.py" in capsys.readouterr().err
  assert ablations.main(["--workdir", str(tmp_path), "--model.num_layer=3"]) == 2
  assert "Did you mean model.num_layers" in capsys.readouterr().err


def test_default_evaluation_of_an_ensemble_of_copies_equals_the_single_model(toy_corpus, tmp_path):
  work = str(tmp_path / "m")
  make_workdir(toy_corpus, work)
  one = ablations.evaluate_models([work], 2, "test", 20)
  two = ablations.evaluate_models([work, work], 2, "test", 20)
  assert one["sentences"] == two["sentences"] == 20
  assert one["bleu"] == two["bleu"] and one["bleu_tok"] == two["bleu_tok"]
  np.testing.assert_allclose(one["test_ppl"], two["test_ppl"], rtol=1e-5)
  vocab_size = len(open(os.path.join(work, "vocab.tgt.txt")).read().split())
  assert 0.5 * vocab_size < one["test_ppl"] < 2 * vocab_size  # untrained: about uniform
  assert one["decode_wps"] > 0 and one["steps"] == [0]


def test_training_words_per_second_is_the_median_after_the_first_line(tmp_path):
  lines = [{"kind": "train", "words_per_s": 5.0}, {"kind": "valid", "valid_ppl": 3.0},
           {"kind": "train", "words_per_s": 100.0}, {"kind": "train", "words_per_s": 300.0},
           {"kind": "train", "words_per_s": 200.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken")
  assert ablations.median_train_wps(str(tmp_path)) == 200.0
  assert ablations.median_train_wps(str(tmp_path / "none")) is None


def test_a_failing_evaluation_is_reported_and_retried(tmp_path):
  lab = FakeLab()
  evaluate = lab.evaluate

  def flaky(workdirs, beam, split, max_sentences):
    if beam == 2:
      raise RuntimeError("decoder broke")
    return evaluate(workdirs, beam, split, max_sentences)

  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=flaky)
  assert set(table["failed"]) == {"single-reversed-L2-seed0-beam2",
                                  "ensemble5-reversed-L2-seed0-beam2"}
  assert len(table["rows"]) == 12 and len(lab.trained) == 8  # the rest went on
  assert ("| Single reversed LSTM (2 layers), beam 2 | failed (rerun) |"
          in (tmp_path / "table1.md").read_text())
  lab.evaluated.clear()
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert table["failed"] == {} and len(table["rows"]) == 14
  assert sorted(b for _, b in lab.evaluated) == [2, 2]


def test_only_runs_the_chosen_row_groups_and_their_models(tmp_path):
  lab = FakeLab()
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate,
                        only=["base", "depth"])
  assert sorted(lab.trained) == ["reversed-L1-seed0", "reversed-L2-seed0", "reversed-L4-seed0"]
  assert sorted(table["rows"]) == ["single-reversed-L1-seed0-beam12",
                                   "single-reversed-L2-seed0-beam12",
                                   "single-reversed-L4-seed0-beam12"]
  md = (tmp_path / "table1.md").read_text()
  assert "| Ensemble of 2 reversed LSTMs, beam 12 | not run (--only) |" in md
  assert "Deeper beats shallower" in md and "Ensemble: pending" in md
  with pytest.raises(c.ConfigError, match="unknown row group"):
    ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate,
                  only=["depths"])


def test_rows_without_the_in_length_perplexity_get_it_on_rerun(tmp_path):
  lab = FakeLab()

  def old_evaluate(workdirs, beam, split, max_sentences):  # as before the column existed
    rec = lab.evaluate(workdirs, beam, split, max_sentences)
    del rec["in_length_ppl"], rec["in_length_sentences"]
    return rec

  calls = []

  def length_fn(workdirs, split, max_sentences):
    calls.append(tuple(os.path.basename(w) for w in workdirs))
    layers = int(calls[-1][0].split("-")[1][1:])
    return {"in_length_ppl": 4.0 - 0.5 * layers, "in_length_sentences": 5}

  ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=old_evaluate,
                length_fn=length_fn, only=["base", "depth"])
  assert calls == []  # fresh rows come from the evaluation itself
  table = ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=old_evaluate,
                        length_fn=length_fn, only=["base", "depth"])
  assert sorted(calls) == [("reversed-L1-seed0",), ("reversed-L2-seed0",), ("reversed-L4-seed0",)]
  assert table["rows"]["single-reversed-L4-seed0-beam12"]["in_length_ppl"] == 2.0
  md = (tmp_path / "table1.md").read_text()
  assert "| test ppl, <= 50 tokens |" in md
  assert ("On the 5 test pairs within the training length (<= 50 tokens a side): test ppl 1 layer "
          "3.500, 2 layers 3.000, 4 layers 2.000 (1->2 layers -14.3%, 2->4 layers -33.3%): "
          "**reproduced**") in md
  calls.clear()
  ablations.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=old_evaluate,
                length_fn=length_fn, only=["base", "depth"])
  assert calls == []


def test_in_length_perplexity_is_the_perplexity_of_the_short_test_pairs(toy_corpus, tmp_path):
  work = str(tmp_path / "m")
  make_workdir(toy_corpus, work, **{"data.max_len": 3})
  with (open(os.path.join(toy_corpus, "test.en")) as fe,
        open(os.path.join(toy_corpus, "test.fr")) as ff):
    pairs = list(zip(fe.read().splitlines(), ff.read().splitlines()))[:20]
  short = [(s, t) for s, t in pairs if len(s.split()) <= 3 and len(t.split()) <= 3]
  assert 0 < len(short) < len(pairs)
  rec = ablations.evaluate_models([work], 1, "test", 20)
  assert rec["in_length_sentences"] == len(short)
  want = evaluate.perplexity(translate.load([work]), short)[1]
  np.testing.assert_allclose(rec["in_length_ppl"], want, rtol=1e-6)
  assert rec["in_length_ppl"] != rec["test_ppl"]
  again = ablations.in_length_perplexity([work], "test", 20)
  assert again == {"in_length_ppl": rec["in_length_ppl"], "in_length_sentences": len(short)}
