"""The ladder runner (Luong et al.'s Table 1): its rungs, skipping finished work, resuming,
another attention type in the same DIR, the findings."""

import json
import os

import pytest
from test_ablations import base_config

from experiments import ladder
from s2s_jax import config as c
from s2s_jax.config import ConfigError


class FakeLab:
  """Fake train/evaluate functions: each rung better than the one below, except the last
  attention type's input feeding (a measured 'not reproduced')."""

  def __init__(self, interrupt=()):
    self.trained, self.evaluated, self.interrupt = [], [], set(interrupt)
    self.configs = {}

  def train(self, cfg, workdir):
    name = os.path.basename(workdir)
    self.trained.append(name)
    self.configs[name] = cfg
    if name in self.interrupt:
      self.interrupt.discard(name)
      return {"step": 3, "interrupted": True}
    return {"step": 10, "valid_ppl": 2.0}

  def evaluate(self, workdir, replace_unk, split, max_sentences):
    name = os.path.basename(workdir)
    self.evaluated.append((name, replace_unk))
    score = {"base": 5.0, "reverse": 6.0, "dropout": 7.0, "attention-location": 9.0,
             "feed-location": 10.0, "attention-general": 9.5, "feed-general": 9.0}[name]
    score += 1.0 if replace_unk else 0.0
    return {"bleu": score, "bleu_tok": score + 1, "test_ppl": 50.0 / score, "signature": "fake",
            "sentences": 7}


def test_plan_is_luongs_table_1():
  rungs = ladder.plan()
  assert [r.key for r in rungs] == ["base", "reverse", "dropout", "attention-location",
                                    "feed-location", "unk-location"]
  assert [(r.luong_ppl, r.luong_bleu) for r in rungs] == [
      (10.6, 11.3), (9.9, 12.6), (8.1, 14.0), (7.3, 16.8), (6.4, 18.1), (None, 20.9)]
  assert rungs[0].overrides == {"data.reverse_source": False, "model.dropout": 0.0,
                                "model.attention": "none", "model.input_feeding": False}
  assert rungs[4].overrides == {"data.reverse_source": True, "model.dropout": 0.2,
                                "model.attention": "location", "model.input_feeding": True}
  assert rungs[5].model == rungs[4].model and rungs[5].replace_unk
  assert ladder.plan("general", 0.3)[3].overrides["model.attention"] == "general"
  with pytest.raises(ConfigError, match="--attention must be one of"):
    ladder.plan("local")


def test_runner_climbs_once_and_skips_finished_work(tmp_path):
  base = base_config(**{"data.reverse_source": True, "model.dropout": 0.5})
  lab = FakeLab()
  table = ladder.run(base, str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert lab.trained == ["base", "reverse", "dropout", "attention-location", "feed-location"]
  assert lab.evaluated[-2:] == [("feed-location", False), ("feed-location", True)]
  assert lab.configs["base"].data.reverse_source is False and lab.configs["base"].model.dropout == 0
  assert lab.configs["feed-location"].model.input_feeding
  assert not table["interrupted"] and len(table["rows"]) == 6
  md = (tmp_path / "ladder.md").read_text()
  assert md.count("**reproduced**") == 9 and "not reproduced" not in md and "pending" not in md
  assert "| + input feeding | 5.000 | 10.00 | 11.00 | +1.00 |" in md
  assert json.loads((tmp_path / "ladder.json").read_text())["rows"] == table["rows"]
  # rerun: nothing to do; another attention type trains only its two rungs
  again = FakeLab()
  ladder.run(base, str(tmp_path), train_fn=again.train, evaluate_fn=again.evaluate)
  assert again.trained == [] and again.evaluated == []
  other = FakeLab()
  table = ladder.run(base, str(tmp_path), attention="general", train_fn=other.train,
                     evaluate_fn=other.evaluate)
  assert other.trained == ["attention-general", "feed-general"]
  md = (tmp_path / "ladder.md").read_text()
  assert "+ global attention (general)" in md and "(location)" not in md
  assert ("+ input feeding: BLEU 9.50 -> 9.00 (-0.50; tokenized -0.50; Luong et al. +1.3): "
          "**not reproduced**") in md
  # a DIR keeps one config and one dropout rate
  with pytest.raises(ConfigError, match="--dropout: 0.2 -> 0.3"):
    ladder.run(base, str(tmp_path), dropout=0.3, train_fn=lab.train, evaluate_fn=lab.evaluate)
  with pytest.raises(ConfigError, match="model.num_layers: 2 -> 3"):
    ladder.run(c.override(base, {"model.num_layers": 3}), str(tmp_path), train_fn=lab.train,
               evaluate_fn=lab.evaluate)


def test_only_some_rungs(tmp_path):
  lab = FakeLab()
  table = ladder.run(base_config(), str(tmp_path), only=["reverse", "unk"], train_fn=lab.train,
                     evaluate_fn=lab.evaluate)
  assert lab.trained == ["reverse", "feed-location"]
  assert lab.evaluated == [("reverse", False), ("feed-location", True)]
  assert set(table["rows"]) == {"reverse", "unk-location"}
  with pytest.raises(ConfigError, match="--only: unknown rung.s. local; rungs: base, reverse"):
    ladder.run(base_config(), str(tmp_path), only=["local"])


def test_interrupted_training_stops_and_the_rerun_resumes(tmp_path):
  lab = FakeLab(interrupt=["dropout"])
  table = ladder.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert table["interrupted"] and set(table["rows"]) == {"base", "reverse"}
  assert "+ dropout 0.2: pending" in (tmp_path / "ladder.md").read_text()
  lab.trained.clear()
  table = ladder.run(base_config(), str(tmp_path), train_fn=lab.train, evaluate_fn=lab.evaluate)
  assert lab.trained == ["dropout", "attention-location", "feed-location"]
  assert not table["interrupted"] and len(table["rows"]) == 6
