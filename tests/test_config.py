"""Config overrides from the command line and the JSON round trip."""

import pytest

from s2s_jax import config as c
from experiments import quickstart, wmt14


def test_overrides_parse_by_type():
  updates, extras = c.parse_args(
      ["--workdir", "/tmp/x", "--model.num_layers=2", "--data.reverse_source=false",
       "--optim.learning_rate", "0.5", "--optim.kwargs={\"b1\": 0.8}", "--data.path=a=b"],
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
