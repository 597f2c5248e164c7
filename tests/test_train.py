"""End-to-end training on a tiny corpus: learning, exact resume, optimizer swap from the CLI,
the compute dtype fixed when a run starts."""

import json
import os
import signal

import jax
import numpy as np
import optax
import pytest

from s2s_jax import checkpoint, hardware, train
from s2s_jax import config as c
from s2s_jax import workdir as workdir_lib

TINY = {"data.source": "text", "data.tokenizer": "none", "model.num_layers": 1,
        "model.hidden_size": 32, "model.embed_size": 16, "train.batch_size": 16,
        "train.log_every": 10}


def tiny_config(corpus, **updates):
  return c.override(c.Config(), {**TINY, "data.path": corpus, **updates})


def valid_ppls(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [r["valid_ppl"] for r in recs if r.get("kind") == "valid"], recs


def tensorboard_scalars(workdir):
  """{tag: [(step, value)]} from the event files (TFRecord framing: length, crc, data, crc)."""
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  folder = os.path.join(workdir, workdir_lib.TENSORBOARD_DIR)
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def final_params(workdir):
  _, params, _, _, step = checkpoint.load_model(workdir)
  return jax.device_get(params), step


def test_training_halves_validation_perplexity(toy_corpus, tmp_path):
  cfg = tiny_config(toy_corpus, **{"train.num_steps": 300, "train.eval_every": 150,
                                   "train.checkpoint_every": 0, "optim.schedule": "constant"})
  result = train.train(cfg, str(tmp_path), progress=False)
  ppls, recs = valid_ppls(str(tmp_path))
  assert len(ppls) == 3  # step 0, 150, 300
  assert ppls[-1] < 0.5 * ppls[0], ppls
  assert result["valid_ppl"] == ppls[-1]
  train_lines = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train_lines] == list(range(10, 301, 10))
  for key in ("train_ppl", "lr", "grad_norm", "words_per_s"):
    assert all(np.isfinite(r[key]) for r in train_lines)
  assert train_lines[0]["lr"] == np.float32(0.7)
  scalars = tensorboard_scalars(str(tmp_path))  # TensorBoard holds the same numbers
  assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train_lines]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["loss"] for r in train_lines], rtol=1e-6)
  assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["valid/valid_ppl"]] == \
      list(zip([0, 150, 300], ppls))


@pytest.mark.parametrize("switches", [{}, {"model.kernels": "plain"},
                                      {"model.dropout": 0.3, "model.attention": "dot"}])
def test_interrupted_run_resumes_to_identical_parameters(toy_corpus, tmp_path, switches):
  """Also under the plain kernels (the path GPUs and TPUs run) and with dropout: its masks
  come from train.seed and the step, so a resume redraws them."""
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  base = {"train.eval_every": 0, "train.checkpoint_every": 7, **switches}
  train.train(tiny_config(toy_corpus, **base, **{"train.num_steps": 30}), full, progress=False)
  # stop after 16 steps (not on a checkpoint boundary: the final save covers it), then resume
  train.train(tiny_config(toy_corpus, **base, **{"train.num_steps": 16}), part, progress=False)
  train.train(tiny_config(toy_corpus, **base, **{"train.num_steps": 30}), part, progress=False)
  (pa, sa), (pb, sb) = final_params(full), final_params(part)
  assert sa == sb == 30
  for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(a, b)


def signal_at(monkeypatch, at_step, signum):
  """Makes `train.train` send this process the real signal `signum` after step `at_step`."""
  original = train.train

  def with_signal(cfg, workdir, progress=True, hooks=()):
    send = lambda t: os.kill(os.getpid(), signum) if t.step == at_step else None
    return original(cfg, workdir, progress, [*hooks, (send, 1)])

  monkeypatch.setattr(train, "train", with_signal)


def test_a_signal_saves_exits_128_plus_its_number_and_the_rerun_resumes_exactly(
    toy_corpus, tmp_path, monkeypatch, capsys):
  argv = lambda workdir: ["--workdir", workdir] + [f"--{k}={v}" for k, v in TINY.items()] + [
      f"--data.path={toy_corpus}", "--model.kernels=plain", "--train.num_steps=12",
      "--train.eval_every=0", "--train.checkpoint_every=0"]
  full, run = str(tmp_path / "full"), str(tmp_path / "run")
  assert train.main(c.Config(), argv(full)) == 0
  saved = []
  for at_step, signum in ((5, signal.SIGTERM), (9, signal.SIGINT)):
    with monkeypatch.context() as m:
      signal_at(m, at_step, signum)
      assert train.main(c.Config(), argv(run)) == 128 + signum
    # stopped after that very step, with a checkpoint of it; the result line says so
    saved.append(at_step)
    assert sorted(checkpoint.manager(run, read_only=True).all_steps()) == saved
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"step": at_step, "interrupted_by_signal": signum}
  assert train.main(c.Config(), argv(run)) == 0
  (pa, sa), (pb, sb) = final_params(full), final_params(run)
  assert sa == sb == 12
  for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), strict=True):
    np.testing.assert_array_equal(a, b)


def test_adam_from_the_command_line_trains(toy_corpus, tmp_path):
  argv = ["--workdir", str(tmp_path)] + [f"--{k}={v}" for k, v in TINY.items()] + [
      f"--data.path={toy_corpus}", "--optim.name=adam", "--optim.learning_rate=0.01",
      "--optim.schedule=constant", '--optim.kwargs={"b1": 0.85}', "--train.num_steps=120",
      "--train.eval_every=120"]
  assert train.main(c.Config(), argv) == 0
  saved = c.load_json(str(tmp_path / "config.json"))
  assert saved.optim.name == "adam" and saved.optim.kwargs == {"b1": 0.85}
  ppls, _ = valid_ppls(str(tmp_path))
  assert ppls[-1] < 0.6 * ppls[0], ppls



def test_auto_dtype_is_fixed_when_a_run_starts_and_kept_on_resume(toy_corpus, tmp_path,
                                                                  monkeypatch, capsys):
  run = str(tmp_path / "run")
  cfg = tiny_config(toy_corpus, **{"model.compute_dtype": "auto", "train.num_steps": 4,
                                   "train.eval_every": 0, "train.checkpoint_every": 0})
  monkeypatch.setattr(hardware, "native_bf16_dtype", lambda: ("bfloat16", "test machine"))
  train.train(cfg, run, progress=False)
  assert c.load_json(os.path.join(run, "config.json")).model.compute_dtype == "bfloat16"
  # On a machine that would choose float32, the run resumes in the dtype it started with.
  monkeypatch.setattr(hardware, "native_bf16_dtype", lambda: ("float32", "test machine"))
  assert workdir_lib.resolve_compute_dtype(cfg, run).model.compute_dtype == "bfloat16"
  assert train.train(c.override(cfg, {"train.num_steps": 6}), run, progress=False)["step"] == 6
  assert (workdir_lib.resolve_compute_dtype(cfg, str(tmp_path / "new")).model.compute_dtype
          == "float32")
  explicit = c.override(cfg, {"model.compute_dtype": "float32"})
  assert workdir_lib.resolve_compute_dtype(explicit, run) == explicit
  # A dtype that does not exist is a one-line error from the command line, before any work.
  argv = ["--workdir", str(tmp_path / "bad")] + [f"--{k}={v}" for k, v in TINY.items()] + [
      f"--data.path={toy_corpus}", "--model.compute_dtype=float16"]
  assert train.main(c.Config(), argv) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == ("error: bad value 'float16' for model.compute_dtype: allowed: one of float32, "
                 "bfloat16, auto")
  assert not os.path.exists(tmp_path / "bad" / "config.json")


def test_a_seed_gives_the_parameters_it_always_gave():
  """train.seed=7 draws the same initial parameters as every release before (values recorded
  from 3cc1a3a), so that results stay comparable across versions."""
  cfg = c.override(c.Config(), {"model.num_layers": 1, "model.hidden_size": 4,
                                "model.embed_size": 3, "train.seed": 7})
  params = train.init_state(cfg, optax.sgd(0.1), 9, 11).params
  np.testing.assert_array_equal(params["encoder"][0]["w_x"][0, :4], np.float32(
      [-0.058653295040130615, -0.05552661791443825, 0.02861318551003933,
       -0.0014864158583804965]))
  np.testing.assert_array_equal(params["softmax"]["b"][:3], np.float32(
      [0.00045209884410724044, 0.05752811208367348, -0.007515239529311657]))
