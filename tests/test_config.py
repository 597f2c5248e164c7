"""Config overrides from the command line and the JSON round trip; every value checked."""

import json
import logging
import os
import re
import typing

import numpy as np
import pytest

from experiments import quickstart, wmt14
from s2s_jax import config as c
from s2s_jax import parallel, train
from s2s_jax.data import tokenize


def test_overrides_parse_by_type():
  updates, extras = c.parse_args(
      ["--workdir", "/tmp/x", "--model.num_layers=2", "--data.reverse_source=false",
       "--optim.learning_rate", "0.5", "--optim.name=adam", "--optim.kwargs={\"b1\": 0.8}",
       "--data.path=a=b"],
      extra_flags=("workdir",))
  cfg = c.override(c.Config(), updates)
  assert extras == {"workdir": "/tmp/x"}
  assert cfg.model.num_layers == 2 and cfg.data.reverse_source is False
  assert cfg.optim.learning_rate == 0.5 and cfg.optim.kwargs == {"b1": 0.8}
  assert cfg.data.path == "a=b"


def test_unknown_field_lists_valid_names():
  with pytest.raises(c.ConfigError) as e:
    c.override(c.Config(), {"model.num_layer": "2"})
  assert "model.num_layers" in str(e.value) and "train.batch_size" in str(e.value)
  with pytest.raises(c.ConfigError, match="unknown flag"):
    c.parse_args(["--bogus=1"], extra_flags=("workdir",))


@pytest.mark.parametrize("name,value", [("model.num_layers", "two"), ("model.num_layers", "1.5"),
                                        ("data.reverse_source", "maybe"), ("optim.kwargs", "[1]")])
def test_wrong_types_are_clear_errors(name, value):
  with pytest.raises(c.ConfigError, match=name.replace(".", r"\.")):
    c.override(c.Config(), {name: value})


def test_json_round_trip(tmp_path):
  cfg = c.override(quickstart.config(), {"optim.name": "adamw", "optim.kwargs": '{"b2": 0.99}'})
  path = str(tmp_path / "config.json")
  c.save_json(cfg, path)
  assert c.load_json(path) == cfg
  assert c.diff(cfg, c.load_json(path)) == []
  assert c.diff(cfg, quickstart.config()) == ["optim.name: 'adamw' -> 'adam'",
                                              "optim.kwargs: {'b2': 0.99} -> {}"]


def test_paper_preset_is_the_paper():
  cfg = wmt14.config()
  assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.embed_size) == (4, 1000, 1000)
  assert (cfg.data.src_vocab_size, cfg.data.tgt_vocab_size) == (160_000, 80_000)
  assert cfg.data.reverse_source and cfg.model.init_scale == 0.08
  assert (cfg.optim.name, cfg.optim.learning_rate, cfg.optim.clip_norm) == ("sgd", 0.7, 5.0)
  assert (cfg.train.batch_size, cfg.train.num_epochs) == (128, 7.5)
  assert (cfg.optim.decay_start_epoch, cfg.optim.decay_every_epochs) == (5.0, 0.5)


def test_quickstart_summary_says_what_was_trained_how_good_and_where_the_plots_are():
  import collections

  import jax.numpy as jnp
  Loaded = collections.namedtuple("Loaded", "cfg params steps")
  params = {"w": jnp.zeros((1000, 1500))}
  text = quickstart.summary(Loaded(quickstart.config(), params, [3190]),
                            {"bleu": 20.971, "perplexity": 4.916, "sentences": 500}, "runs/q")
  assert "2-layer LSTM encoder-decoder (256 cells a layer, 1.5M parameters) for 3,190 steps" in text
  assert "100,000 English->French sentence pairs" in text and "source read reversed" in text
  assert "test BLEU 21.0 on 500 held-out sentences" in text and "among 5 equally likely" in text
  assert "runs/q/curves.png" in text and "runs/q/pca.png" in text


def test_a_config_json_with_the_old_custom_vjp_field_still_loads():
  assert c.from_dict({"model": {"custom_vjp": False}}).model.kernels == "plain"
  assert c.from_dict({"model": {"custom_vjp": True, "num_layers": 2}}).model.kernels == "auto"


# ------------------------------------------------------------------ every value checked up front

# Numeric values that are accepted although 0 or negative, and why.
ACCEPTED = {
    ("model.dropout", "0"): "no dropout, the paper's model",
    ("optim.label_smoothing", "0"): "the paper's loss",
    ("data.max_len", "0"): "no length limit",
    ("data.bucket_growth", "0"): "every multiple of data.bucket_width is a padded length",
    ("data.synthetic_seed", "0"): "a seed",
    ("data.max_eval_sentences", "0"): "every validation sentence",
    ("data.workers", "0"): "one tokenizer process per CPU core",
    ("optim.clip_norm", "0"): "no gradient clipping",
    ("optim.decay_start_epoch", "0"): "the decay starts at the first step",
    ("train.num_steps", "0"): "the length comes from train.num_epochs",
    ("train.eval_every", "0"): "evaluation only at the end",
    ("train.checkpoint_every", "0"): "a checkpoint only at the end",
    ("train.seed", "0"): "a seed",
    ("train.max_bad_steps", "0"): "never stop for non-finite steps",
    ("decode.max_len_a", "0"): "the cap is max_len_b for every sentence",
    ("decode.max_len_b", "0"): "the cap is floor(a * |x|) (at least 1, the </s>)",
    ("decode.length_penalty", "0"): "no length normalisation, the paper's ranking",
    ("parallel.data", "-1"): "all devices",
}
# An unknown value for each string field with a fixed set of values or a form.
UNKNOWN_STRINGS = {
    "model.compute_dtype": ["float16"], "model.kernels": ["fast"], "data.source": ["hdf5"],
    "model.attention": ["local"], "model.encoder": ["deep"],
    "data.tokenizer": ["bpe"], "data.src_lang": ["", "e n"], "data.tgt_lang": ["", "f/r"],
    "data.tfds_name": [""], "optim.name": ["adamm", "global_norm", "_src"],
    "optim.schedule": ["cosine"], "parallel.strategy": ["fsdp"],
}
# String fields where any text is a valid value, and why.
FREE_TEXT = {
    "data.path": "a folder, read when data.source=text (empty then refused)",
    "data.tfds_data_dir": "a folder, or empty for TFDS's default",
    "data.tfds_manual_dir": "a folder, or empty",
    "data.prepared_dir": "a folder, or empty for the default data store",
}


def _field_values(cfg: c.Config):
  """(field, command-line value) pairs to try: every numeric field with 0, negative values
  and values of the wrong type; every string field with unknown values; booleans and the
  optimizer arguments with wrong values."""
  for name in c.field_names(cfg):
    sec, fld = name.split(".")
    kind = typing.get_type_hints(type(getattr(cfg, sec)))[fld]
    if kind in (int, float):
      wrong = ["2.5"] if kind is int else ["nan", "inf", "-inf"]
      values = ["0", "-1", "-3", "abc", ""] + wrong
    elif kind is bool:
      values = ["maybe", "2"]
    elif kind is str:
      assert (name in UNKNOWN_STRINGS) != (name in FREE_TEXT), name  # decide for each string
      values = UNKNOWN_STRINGS.get(name, [])
    else:
      values = ["[1]", "{not json", '{"momentum": 0.9, "beta": 1}']
    for value in values:
      yield name, value


def test_every_field_has_a_rule_and_docs_list_them():
  cfg = c.Config()
  assert sorted(c.ALLOWED) == sorted(c.field_names(cfg))
  docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")).read()
  rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| (.+?) \|$", docs, re.MULTILINE))
  assert rows == {name: c.describe(name) for name in c.field_names(cfg)}
  # the value sets the code dispatches on are the config's
  assert set(parallel.STRATEGIES) == set(c.STRATEGIES) and tokenize.KINDS == c.TOKENIZERS


def test_bad_values_are_one_line_errors_before_any_work(tmp_path, capsys):
  """Through the command line of the quickstart preset: a one-line error (exit 2) that names
  the field, the value and what is allowed; no traceback; nothing written, no data read."""
  store = os.environ["S2S_JAX_DATA"]
  before = sorted(os.listdir(store))
  preset = quickstart.config()
  tried, accepted = 0, set()
  handlers, level = logging.root.handlers[:], logging.root.level
  for name, value in _field_values(preset):
    if (name, value) in ACCEPTED:
      c.override(preset, {name: value})
      accepted.add((name, value))
      continue
    workdir = str(tmp_path / "w")
    try:
      rc = train.main(preset, ["--workdir", workdir, f"--{name}={value}"])
    finally:
      logging.root.handlers[:] = handlers
      logging.root.setLevel(level)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, (name, value, err)
    assert err.startswith("error: bad value ") and f" for {name}: allowed: " in err, err
    assert (repr(json.loads(value)) if value.startswith('{"') else value) in err, err
    assert not os.path.exists(workdir), (name, value)
    tried += 1
  assert accepted == set(ACCEPTED) and tried > 250
  assert sorted(os.listdir(store)) == before


def test_presets_and_config_json_are_checked_too(tmp_path):
  with pytest.raises(c.ConfigError, match=r"^bad value 0 for train.keep_checkpoints: allowed: "
                     r"an integer >= 1$"):
    c.TrainConfig(keep_checkpoints=0)
  with pytest.raises(c.ConfigError, match=r"bad value 4 for decode.nbest: allowed: an integer "
                     r"from 1 to decode.beam_size; decode.beam_size is 2$"):
    c.override(c.Config(), {"decode.beam_size": "2", "decode.nbest": "4"})
  with pytest.raises(c.ConfigError, match="bad value '' for data.path"):
    c.DataConfig(source="text")
  path = tmp_path / "config.json"
  c.save_json(c.Config(), str(path))
  path.write_text(path.read_text().replace('"decay_every_epochs": 0.5', '"decay_every_epochs": 0'))
  with pytest.raises(c.ConfigError, match=f"^{path}: bad value 0.0 for optim.decay_every_epochs: "
                     "allowed: a finite number > 0$"):
    c.load_json(str(path))


def test_accepted_zero_and_negative_values_run_end_to_end(tmp_path, toy_corpus, capsys):
  """Every value of ACCEPTED, together, in one short run of the command line."""
  argv = ["--workdir", str(tmp_path), "--data.source=text", f"--data.path={toy_corpus}",
          "--data.tokenizer=none", "--model.num_layers=1", "--model.hidden_size=16",
          "--model.embed_size=8", "--train.batch_size=16", "--train.num_epochs=0.05",
          "--train.log_every=1"] + [f"--{name}={value}" for name, value in ACCEPTED]
  assert train.main(c.Config(), argv) == 0, capsys.readouterr().err[-2000:]
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2  # ceil(0.05 * 38)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["lr"] for r in records if r["kind"] == "train"] == [np.float32(0.35)] * 2  # halved
  assert [r["step"] for r in records if r["kind"] == "valid"] == [2]  # only at the end
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
