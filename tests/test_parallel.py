"""Many devices: mesh, pmap and data x model layouts train like one device; sharded decoding;
checkpoints move between device counts; clear errors (8 virtual CPU devices, see conftest)."""

import json
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from s2s_jax import checkpoint, decode, model, optim, parallel, train
from s2s_jax.config import Config, ConfigError, ModelConfig, OptimConfig, ParallelConfig, override
from s2s_jax.data import pipeline
from s2s_jax.parallel import devices

CFG = Config(model=ModelConfig(num_layers=1, hidden_size=16, embed_size=16))
VOCAB = 20
LAYOUTS = {"mesh8x1": ParallelConfig(), "pmap8": ParallelConfig(strategy="pmap"),
           "mesh2x4": ParallelConfig(data=2, model=4)}


# Momentum gives the optimizer state a copy of every parameter (the softmax one sharded).
TX = optim.make_optimizer(OptimConfig(name="sgd", learning_rate=0.5, schedule="constant",
                                      kwargs={"momentum": 0.9}), steps_per_epoch=10)[0]
_STEPS = {}


def layout_and_steps(name):
  """(strategy, (train_fn, eval_fn)) compiled once per layout name (None = one device)."""
  if name not in _STEPS:
    strategy = None if name is None else parallel.make(LAYOUTS[name], num_layers=1,
                                                       batch_sizes={"batch": 16})
    _STEPS[name] = strategy, train.make_steps(CFG, TX, strategy)
  return _STEPS[name]


def make_batches(n, rows=16, length=5, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    src = rng.integers(4, VOCAB, (rows, length)).astype(np.int32)
    tgt = rng.integers(4, VOCAB, (rows, length)).astype(np.int32)
    for i in range(rows):
      src[i, rng.integers(1, length + 1):] = 0
      tgt[i, rng.integers(1, length + 1):] = 0
    src[2:4], tgt[2:4] = 0, 0  # under pmap over 8, device 1 holds only all-padding rows
    out.append({"src": src, "tgt": tgt})
  return out


def run_steps(name, batches, state=None):
  """Trains on `batches` under layout `name`: (losses, host state after 1 step, host state
  after all, device state)."""
  strategy, (train_fn, _) = layout_and_steps(name)
  state = train.init_state(CFG, TX, VOCAB, VOCAB) if state is None else state
  if strategy is not None:
    state = strategy.place(state)
  losses, first = [], None
  for b in batches:
    state, metrics = train_fn(state, b)
    losses.append(float(metrics["loss"]))
    first = jax.device_get(state) if first is None else first
  return losses, first, jax.device_get(state), state


def assert_close_trees(got, want, rtol=1e-5):
  """Every leaf within rtol of the largest magnitude in the reference leaf."""
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, scale = np.max(np.abs(a - b)), max(np.max(np.abs(b)), 1e-12)
    assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


@pytest.fixture(scope="module")
def batches():
  return make_batches(10)


@pytest.fixture(scope="module")
def reference(batches):
  return run_steps(None, batches)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_train_like_one_device(name, batches, reference):
  losses, first, last, state = run_steps(name, batches)
  ref_losses, ref_first, ref_last, _ = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_close_trees(first, ref_first)
  assert_close_trees(last, ref_last)
  eval_fn, ref_eval_fn = layout_and_steps(name)[1][1], layout_and_steps(None)[1][1]
  evaluated = jax.device_get(eval_fn(state.params, batches[0]))
  ref_eval = jax.device_get(ref_eval_fn(jax.device_put(last.params), batches[0]))
  assert int(evaluated["num_tokens"]) == int(ref_eval["num_tokens"]) > 0
  np.testing.assert_allclose(evaluated["nll_sum"], ref_eval["nll_sum"], rtol=1e-5)
  # The parameters (and their momentum) stay where the layout put them.
  specs = [x.sharding.spec for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
           if jax.tree_util.keystr(path).endswith("['softmax']['w']")]
  want = P(None, "model") if name == "mesh2x4" else P()
  assert specs == [want, want]  # the parameter and its momentum
  assert state.params["encoder"][0]["w_h"].sharding.spec == P()


def test_sharded_softmax_never_holds_full_vocabulary_logits():
  v, t, b = 24, 7, 16  # distinct sizes, so shapes in the HLO say what they are
  strategy = parallel.make(ParallelConfig(data=2, model=4), num_layers=1)
  params = strategy.place(model.init_params(jax.random.PRNGKey(1), CFG.model, VOCAB, v))
  rng = np.random.default_rng(1)
  batch = {"src": rng.integers(1, VOCAB, (b, 5)).astype(np.int32),
           "tgt": rng.integers(1, v, (b, t)).astype(np.int32)}
  grad_fn = jax.jit(jax.value_and_grad(lambda p, x: strategy.loss(p, x, CFG.model)[0]))
  hlo = grad_fn.lower(params, devices.place_batch(strategy.mesh, batch)).compile().as_text()
  assert re.search(rf"f32\[[0-9,]*,{v}\]", hlo) is None  # no array ends in the full vocabulary
  assert f"f32[{t},{b // 2},{v // 4}]" in hlo  # the local logits: rows / data, vocabulary / model
  assert "all-gather" not in hlo


def test_decoding_with_the_batch_sharded_matches_one_device():
  params = model.init_params(jax.random.PRNGKey(2), CFG.model, VOCAB, VOCAB)
  rng = np.random.default_rng(2)
  src = rng.integers(4, VOCAB, (13, 5)).astype(np.int32)  # 13 rows: padded to 16 and cut back
  for i, n in enumerate(rng.integers(1, 6, 13)):
    src[i, n:] = 0
  mesh = parallel.make(ParallelConfig(), num_layers=1).mesh
  kw = dict(cfg=CFG.model, max_len=9)
  tok, lp = devices.run_batch_sharded(decode.greedy, mesh, params, src, **kw)
  ref_tok, ref_lp = jax.device_get(decode.greedy(params, src, **kw))
  assert tok.shape == ref_tok.shape == (13, 9)
  np.testing.assert_array_equal(tok, ref_tok)
  np.testing.assert_allclose(lp, ref_lp, rtol=1e-5)
  hyp = devices.run_batch_sharded(decode.beam, mesh, params, src, beam_size=3, nbest=2, **kw)
  ref_hyp = jax.device_get(decode.beam(params, src, beam_size=3, nbest=2, **kw))
  np.testing.assert_array_equal(hyp[0], ref_hyp[0])
  np.testing.assert_allclose(hyp[1], ref_hyp[1], rtol=1e-5)
  scores = devices.run_batch_sharded(decode.score, mesh, params, src, ref_tok, cfg=CFG.model)
  np.testing.assert_allclose(scores, ref_lp, rtol=1e-5)  # greedy's log p is the path's score


def test_checkpoints_move_between_device_counts(tmp_path, batches):
  def save(state, folder):
    mngr = checkpoint.manager(str(tmp_path / folder))
    checkpoint.save(mngr, 2, state, {"epoch": 0, "index": 2, "seed": 0})
    mngr.wait_until_finished()
    return mngr

  # Written under 2x4 (softmax split over 4 devices), restored onto one device: same values,
  # and both continue training alike.
  *_, host_sharded, sharded = run_steps("mesh2x4", batches[:2])
  one, _ = checkpoint.restore(save(sharded, "a"), 2, train.init_state(CFG, TX, VOCAB, VOCAB))
  assert one.params["softmax"]["w"].sharding.num_devices == 1
  assert_close_trees(jax.device_get(one), host_sharded, rtol=0)
  np.testing.assert_allclose(run_steps(None, batches[2:4], state=one)[0],
                             run_steps("mesh2x4", batches[2:4], state=sharded)[0], rtol=1e-5)
  # Written on one device, restored onto pmap over 8 devices.
  *_, host_single, single = run_steps(None, batches[:2])
  like = layout_and_steps("pmap8")[0].place(train.init_state(CFG, TX, VOCAB, VOCAB))
  eight, _ = checkpoint.restore(save(single, "b"), 2, like)
  assert eight.params["softmax"]["w"].sharding.num_devices == 8
  assert_close_trees(jax.device_get(eight), host_single, rtol=0)
  np.testing.assert_allclose(run_steps("pmap8", batches[2:4], state=eight)[0],
                             run_steps(None, batches[2:4], state=single)[0], rtol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "plain"])  # plain: the path GPUs and TPUs run
def test_train_resumes_on_another_device_count(tmp_path, kernels):
  # 1-3 words per sentence (one padded length: one compiled shape per layout), w3 -> f3.
  corpus, rng = tmp_path / "corpus", np.random.default_rng(3)
  corpus.mkdir()
  for split, n in (("train", 96), ("valid", 16), ("test", 16)):
    lines = [[f"{w}" for w in rng.integers(0, 12, rng.integers(1, 4))] for _ in range(n)]
    (corpus / f"{split}.en").write_text(
        "".join(" ".join("w" + w for w in toks) + "\n" for toks in lines))
    (corpus / f"{split}.fr").write_text(
        "".join(" ".join("f" + w for w in toks) + "\n" for toks in lines))
  cfg = override(Config(), {
      "model.num_layers": 1, "model.hidden_size": 16, "model.embed_size": 16,
      "data.source": "text", "data.path": str(corpus), "data.tokenizer": "none",
      "data.bucket_width": 4,
      "data.max_eval_sentences": 16, "train.batch_size": 16, "train.eval_batch_size": 16,
      "train.num_steps": 3, "train.eval_every": 0, "train.log_every": 1,
      "optim.schedule": "constant", "optim.learning_rate": 0.5, "model.kernels": kernels})
  workdir = str(tmp_path / "run")
  first = train.train(cfg, workdir, progress=False)  # 8 devices (parallel.data=-1)
  assert first["step"] == 3
  resumed = train.train(override(cfg, {"train.num_steps": 5, "parallel.data": 1}), workdir,
                        progress=False)
  assert resumed["step"] == 5 and np.isfinite(resumed["valid_ppl"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]
  assert steps == [1, 2, 3, 4, 5]
  # Decoding's restore onto all 8 devices (replicated) reads the same parameters.
  src_vocab, tgt_vocab = map(len, pipeline.load_vocabs(workdir))
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg.model, src_vocab,
                                                  tgt_vocab))
  mesh = parallel.make(ParallelConfig(), num_layers=1).mesh
  on_eight, step = checkpoint.restore_params(workdir, like, sharding=devices.replicated(mesh))
  on_one, _ = checkpoint.restore_params(workdir, like)
  assert step == 5 and on_eight["softmax"]["w"].sharding.num_devices == 8
  assert_close_trees(jax.device_get(on_eight), jax.device_get(on_one), rtol=0)


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path, toy_corpus):
  make = lambda pcfg, sizes: parallel.make(pcfg, num_layers=1, batch_sizes=sizes)
  with pytest.raises(ConfigError) as e:
    make(ParallelConfig(), {"train.batch_size": 12})
  msg = str(e.value)
  assert "train.batch_size=12" in msg and "data-parallel size 8" in msg and "8 devices" in msg
  assert "8 or 16" in msg and "parallel.data to one of 1, 2, 3, 4, 6" in msg
  with pytest.raises(ConfigError, match=r"1 per data replica under parallel.strategy=mesh\): "
                                        r"use a multiple of 4"):
    make(ParallelConfig(data=4), {"train.eval_batch_size": 6})
  make(ParallelConfig(data=4), {"train.batch_size": 12})  # 12 / 4 is fine
  # Through the training entry point: refused before anything is traced or written.
  cfg = override(Config(), {"data.source": "text", "data.path": toy_corpus,
                            "data.tokenizer": "none", "train.batch_size": 10})
  with pytest.raises(ConfigError, match="train.batch_size=10 does not divide"):
    train.train(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


def test_other_layout_errors():
  make = lambda **kw: parallel.make(ParallelConfig(**kw), num_layers=1)
  with pytest.raises(ConfigError, match="needs parallel.strategy=mesh"):
    make(strategy="pmap", model=2)
  with pytest.raises(ConfigError, match=r"parallel.data=4 replicas x parallel.model=4 devices, "
                                        "but only 8 are available"):
    make(data=4, model=4)
  with pytest.raises(ConfigError, match="parallel.model=3 devices per data replica do not divide "
                                        "the 8 devices: set parallel.model to one of 1, 2, 4, 8"):
    make(model=3)
  with pytest.raises(ConfigError, match="bad value 'pjit' for parallel.strategy: allowed: one of "
                                        "mesh, pmap, layers"):
    make(strategy="pjit")
  with pytest.raises(ConfigError, match=r"bad value 0 for parallel.data: allowed: an integer, -1 "
                                        r"\(all devices\) or >= 1"):
    make(data=0)
  strategy = make(data=1, model=8)
  with pytest.raises(ConfigError, match="parallel.model=8 must divide the target vocabulary"):
    strategy.place(model.init_params(jax.random.PRNGKey(0), CFG.model, VOCAB, VOCAB))


def test_distributed_initialize_reads_config_and_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert not parallel.initialize(ParallelConfig(), environ={})
  assert calls == []
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  assert parallel.initialize(ParallelConfig(), environ=env)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]
  assert parallel.initialize(ParallelConfig(distributed=True), environ={})  # cluster auto-detection
  assert calls[-1] == {}
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID='x' is not an integer"):
    parallel.initialize(ParallelConfig(distributed=True), environ={"JAX_PROCESS_ID": "x"})


# Every switch beyond the paper at once: attention with input feeding, the bidirectional
# encoder, dropout (masks drawn per global row) and label smoothing (vocabulary-sharded too).
SWITCHED = override(CFG, {"model.attention": "general", "model.input_feeding": True,
                          "model.encoder": "bi", "model.dropout": 0.2,
                          "optim.label_smoothing": 0.1})


@pytest.fixture(scope="module")
def switched_runs(batches):
  """(strategy, losses, device state) after 3 steps, per layout (None = one device)."""
  runs = {}
  for name in (None, "mesh2x4", "pmap8"):
    strategy = None if name is None else parallel.make(LAYOUTS[name], num_layers=1)
    train_fn = train.make_steps(SWITCHED, TX, strategy)[0]
    state = train.init_state(SWITCHED, TX, VOCAB, VOCAB)
    state = state if strategy is None else strategy.place(state)
    losses = []
    for b in batches[:3]:
      state, metrics = train_fn(state, b)
      losses.append(float(metrics["loss"]))
    runs[name] = strategy, train_fn, losses, state
  return runs


def test_switches_train_like_one_device_under_mesh_and_pmap(switched_runs):
  """Dropout masks follow the global row and the smoothed loss is summed like the NLL."""
  _, _, ref_losses, ref_state = switched_runs[None]
  for name in ("mesh2x4", "pmap8"):
    _, _, losses, state = switched_runs[name]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_close_trees(jax.device_get(state), jax.device_get(ref_state))


def test_attention_checkpoints_restore_across_layouts(tmp_path, switched_runs, batches):
  strategy, train_fn, _, sharded = switched_runs["mesh2x4"]
  mngr = checkpoint.manager(str(tmp_path / "a"))
  checkpoint.save(mngr, 3, sharded, {"epoch": 0, "index": 3, "seed": 0})
  mngr.wait_until_finished()
  one, _ = checkpoint.restore(mngr, 3, train.init_state(SWITCHED, TX, VOCAB, VOCAB))
  assert "attention" in one.params and one.params["softmax"]["w"].sharding.num_devices == 1
  assert_close_trees(jax.device_get(one), jax.device_get(sharded), rtol=0)
  pmap_strategy, pmap_fn, _, _ = switched_runs["pmap8"]
  eight, _ = checkpoint.restore(mngr, 3, pmap_strategy.place(
      train.init_state(SWITCHED, TX, VOCAB, VOCAB)))
  assert_close_trees(jax.device_get(eight), jax.device_get(sharded), rtol=0)
  losses = [float(fn(s, batches[3])[1]["loss"]) for fn, s in (
      (switched_runs[None][1], one), (train_fn, sharded), (pmap_fn, eight))]
  np.testing.assert_allclose(losses[1:], [losses[0]] * 2, rtol=1e-5)


def test_layers_strategy_refuses_the_switches(tmp_path, toy_corpus):
  layout = parallel.make(ParallelConfig(strategy="layers", model=1, data=1), num_layers=1)
  with pytest.raises(ConfigError, match="parallel.strategy=layers runs the paper's model only, "
                                        "without model.attention, model.input_feeding, "
                                        "model.encoder, model.dropout, optim.label_smoothing"):
    train.make_steps(SWITCHED, TX, layout)
  cfg = override(SWITCHED, {"data.source": "text", "data.path": toy_corpus,
                            "data.tokenizer": "none", "parallel.strategy": "layers",
                            "parallel.model": 1, "parallel.data": 1, "model.dropout": 0.0,
                            "model.encoder": "uni", "model.input_feeding": False,
                            "optim.label_smoothing": 0.0})
  with pytest.raises(ConfigError, match=r"without model.attention: use parallel.strategy=mesh"):
    train.train(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")
