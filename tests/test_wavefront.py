"""parallel.strategy=layers (s2s_jax/parallel/layers.py): one LSTM layer per device, the softmax on
more devices, trains like one device; placement; checkpoints across layouts; clear errors
(8 virtual CPU devices, see conftest)."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from s2s_jax import checkpoint, model, optim, parallel, train
from s2s_jax.config import Config, ConfigError, ModelConfig, OptimConfig, ParallelConfig, override
from s2s_jax.parallel import devices

L, H = 4, 16
SRC_VOCAB, TGT_VOCAB = 40, 48
CFG = Config(model=ModelConfig(num_layers=L, hidden_size=H, embed_size=H))
PAPER = ParallelConfig(strategy="layers", model=4)  # 4 layer devices + 4 softmax devices
TX = optim.make_optimizer(OptimConfig(name="sgd", learning_rate=0.5, schedule="constant",
                                      kwargs={"momentum": 0.9}), steps_per_epoch=10)[0]


def make_batch(seed, rows=8, src_len=5, tgt_len=6):
  """Rows of different lengths, an all-padding target row and an empty source row."""
  rng = np.random.default_rng(seed)
  src = rng.integers(4, SRC_VOCAB, (rows, src_len)).astype(np.int32)
  tgt = rng.integers(4, TGT_VOCAB, (rows, tgt_len)).astype(np.int32)
  for r in range(rows):
    src[r, rng.integers(1, src_len + 1):] = 0
    tgt[r, rng.integers(1, tgt_len + 1):] = 0
  tgt[3], src[5] = 0, 0
  return {"src": src, "tgt": tgt}


def assert_close_trees(got, want, rtol=1e-5, atol=1e-7):
  """Every leaf within rtol of the largest magnitude in the reference leaf (plus atol)."""
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (jax.tree_util.keystr(path), a.shape, b.shape)
    err, scale = np.max(np.abs(a - b), initial=0.0), np.max(np.abs(b), initial=0.0)
    assert err <= rtol * scale + atol, (jax.tree_util.keystr(path), err, scale)


@pytest.mark.parametrize("pcfg,embed", [(PAPER, H),
                                        (ParallelConfig(strategy="layers", model=2, data=2), 12)])
def test_loss_and_gradients_equal_one_device(pcfg, embed):
  mcfg = ModelConfig(num_layers=L if pcfg.data == -1 else 2, hidden_size=H, embed_size=embed)
  params = model.init_params(jax.random.PRNGKey(0), mcfg, SRC_VOCAB, TGT_VOCAB)
  batch = make_batch(0)
  (ref_loss, ref_aux), ref_grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, batch, mcfg)
  layout = parallel.make(pcfg, num_layers=mcfg.num_layers, batch_sizes={"batch": 8})
  assert dict(layout.mesh.shape) == ({"data": 1, "stage": 8} if pcfg.data == -1
                                     else {"data": 2, "stage": 4})
  (loss, aux), grads = jax.jit(jax.value_and_grad(layout.loss, has_aux=True), static_argnums=2)(
      layout.place(params), devices.place_batch(layout.mesh, batch), mcfg)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(float(aux["nll_sum"]), float(ref_aux["nll_sum"]), rtol=1e-6)
  assert int(aux["num_tokens"]) == int(ref_aux["num_tokens"]) > 0
  assert int(aux["num_sents"]) == int(ref_aux["num_sents"]) == 7
  grads = jax.device_get(layout.to_canonical(grads))
  assert_close_trees(grads, ref_grads, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def paper_run():
  """Three momentum steps on one device and under the 4 + 4 layout, from the same init."""
  layout = parallel.make(PAPER, num_layers=L, batch_sizes={"batch": 8})
  batches = [make_batch(s) for s in range(3)]
  runs = {}
  for name, lay in (("one", None), ("layers", layout)):
    train_fn, eval_fn = train.make_steps(CFG, TX, lay)
    state = train.init_state(CFG, TX, SRC_VOCAB, TGT_VOCAB)
    state = state if lay is None else lay.place(state)
    losses = []
    for b in batches:
      state, metrics = train_fn(state, b)
      losses.append(float(metrics["loss"]))
    runs[name] = losses, state, eval_fn
  return layout, batches, runs


def test_training_steps_equal_one_device(paper_run):
  layout, batches, runs = paper_run
  ref_losses, ref_state, ref_eval = runs["one"]
  losses, state, eval_fn = runs["layers"]
  assert losses[0] > losses[-1]  # it learns
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  canonical = layout.to_canonical(state)
  assert int(canonical.step) == 3
  assert_close_trees(jax.device_get(canonical), jax.device_get(ref_state))  # params and momentum
  got = jax.device_get(eval_fn(state.params, batches[0]))
  want = jax.device_get(ref_eval(ref_state.params, batches[0]))
  assert int(got["num_tokens"]) == int(want["num_tokens"])
  np.testing.assert_allclose(got["nll_sum"], want["nll_sum"], rtol=1e-5)


def test_each_layer_and_softmax_slice_lives_on_its_device(paper_run):
  layout, _, runs = paper_run
  state = runs["layers"][1]
  devices = jax.devices()
  vm = TGT_VOCAB // 4
  trees = {"params": state.params, "momentum": state.opt_state[1][0].trace}
  for where, params in trees.items():
    for stack in ("encoder", "decoder"):
      for name, x in params[stack].items():
        assert x.shape[0] == 8, (where, stack, name)
        for shard in x.addressable_shards:
          stage = shard.index[0].start
          assert shard.data.shape[0] == 1 and shard.device == devices[stage], (stack, name)
    w = params["softmax"]["w"]
    assert w.shape == (8, H, vm)
    homes = {s.index[0].start: s.device for s in w.addressable_shards}
    assert homes == {i: devices[i] for i in range(8)}
  # Stage 4 + j holds columns j*V/4 .. (j+1)*V/4 of the canonical softmax; layer 2 on device 2.
  canonical = jax.device_get(layout.to_canonical(state.params))
  on_6 = next(s for s in state.params["softmax"]["w"].addressable_shards
              if s.device == devices[6])
  np.testing.assert_array_equal(np.asarray(on_6.data)[0],
                                canonical["softmax"]["w"][:, 2 * vm:3 * vm])
  on_2 = next(s for s in state.params["decoder"]["w_h"].addressable_shards
              if s.device == devices[2])
  np.testing.assert_array_equal(np.asarray(on_2.data)[0], canonical["decoder"][2]["w_h"])
  # Slots a stage does not use are zeros: no LSTM weights on the softmax devices and vice versa.
  for s in state.params["encoder"]["w_x"].addressable_shards:
    assert (s.index[0].start >= L) == (not np.any(np.asarray(s.data)))
  for s in state.params["softmax"]["w"].addressable_shards:
    assert (s.index[0].start < L) == (not np.any(np.asarray(s.data)))
  assert state.params["src_embed"].sharding.is_fully_replicated


def test_checkpoints_restore_across_layouts(tmp_path, paper_run):
  layout, batches, runs = paper_run
  state = runs["layers"][1]
  data_state = {"epoch": 0, "index": 3, "seed": 0}
  # Written under layers, restored under mesh (2 x 4, softmax split over `model`).
  mngr = checkpoint.manager(str(tmp_path / "a"))
  checkpoint.save(mngr, 3, layout.to_canonical(state), data_state)
  mngr.wait_until_finished()
  mesh = parallel.make(ParallelConfig(data=2, model=4), num_layers=L)
  like = mesh.place(train.init_state(CFG, TX, SRC_VOCAB, TGT_VOCAB))
  on_mesh, data = checkpoint.restore(mngr, 3, like)
  assert data == data_state and on_mesh.params["softmax"]["w"].sharding.spec[1] == "model"
  want = jax.device_get(layout.to_canonical(state))
  assert_close_trees(jax.device_get(on_mesh), want, rtol=0, atol=0)
  # Written on one device, restored under layers: the same values as placing them directly.
  ref_state = runs["one"][1]
  mngr = checkpoint.manager(str(tmp_path / "b"))
  checkpoint.save(mngr, 3, ref_state, data_state)
  mngr.wait_until_finished()
  like = layout.to_canonical(layout.place(train.init_state(CFG, TX, SRC_VOCAB, TGT_VOCAB)))
  restored, _ = checkpoint.restore(mngr, 3, like)
  restored = layout.from_canonical(restored)
  direct = layout.place(jax.device_get(ref_state))
  assert_close_trees(jax.device_get(restored), jax.device_get(direct), rtol=0, atol=0)
  assert restored.params["encoder"]["w_h"].sharding.spec == P("stage")
  # and it trains on from there exactly like one device
  train_fn = train.make_steps(CFG, TX, layout)[0]
  _, metrics = train_fn(restored, batches[0])
  _, ref_metrics = train.make_steps(CFG, TX)[0](ref_state, batches[0])
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "plain"])  # plain: the path GPUs and TPUs run
def test_train_under_layers_then_resume_under_mesh(tmp_path, kernels):
  corpus, rng = tmp_path / "corpus", np.random.default_rng(3)
  corpus.mkdir()
  for split, n in (("train", 64), ("valid", 8), ("test", 8)):
    lines = [[str(w) for w in rng.integers(0, 12, rng.integers(1, 4))] for _ in range(n)]
    (corpus / f"{split}.en").write_text(
        "".join(" ".join("w" + w for w in toks) + "\n" for toks in lines))
    (corpus / f"{split}.fr").write_text(
        "".join(" ".join("f" + w for w in toks) + "\n" for toks in lines))
  cfg = override(Config(), {
      "model.num_layers": 2, "model.hidden_size": 8, "model.embed_size": 8,
      "data.source": "text", "data.path": str(corpus), "data.tokenizer": "none",
      "data.bucket_width": 4, "data.tgt_vocab_size": 12,  # 12 words + 4 specials: 16 ids
      "train.batch_size": 8, "train.eval_batch_size": 8, "train.num_steps": 2,
      "train.eval_every": 0, "train.log_every": 1, "optim.schedule": "constant",
      "optim.learning_rate": 0.5, "parallel.strategy": "layers", "parallel.model": 2,
      "model.kernels": kernels})
  workdir = str(tmp_path / "run")
  first = train.train(cfg, workdir, progress=False)  # 2 layers + 2 softmax, data 2
  assert first["step"] == 2 and np.isfinite(first["valid_ppl"])
  resumed = train.train(override(cfg, {"train.num_steps": 3, "parallel.strategy": "mesh",
                                       "parallel.model": 1}),
                        workdir, progress=False)
  assert resumed["step"] == 3 and np.isfinite(resumed["valid_ppl"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [r["step"] for r in map(json.loads, f) if r["kind"] == "train"] == [1, 2, 3]


def test_layouts_that_do_not_fit_are_clear_errors():
  make = lambda num_layers, sizes=None, **kw: parallel.make(
      ParallelConfig(strategy="layers", **kw), num_layers=num_layers, batch_sizes=sizes)
  with pytest.raises(ConfigError, match=r"model.num_layers \+ parallel.model = 4 \+ 5 = 9 "
                                        r"devices per data replica, but only 8 are available"):
    make(4, model=5)
  with pytest.raises(ConfigError, match=r"4 \+ 2 = 6 devices per data replica do not divide the "
                                        r"8 devices: set parallel.model to one of 4"):
    make(4, model=2)
  make(4, model=2, data=1)  # 6 of 8 devices, named: fine
  with pytest.raises(ConfigError, match=r"parallel.data=2 replicas x .* = 6 devices, but only 8"):
    make(4, model=2, data=2)
  with pytest.raises(ConfigError,
                     match=r"bad value 0 for parallel.model: allowed: an integer >= 1"):
    make(4, model=0)
  with pytest.raises(ConfigError, match=r"model.num_layers must be >= 1"):
    make(0, model=4)
  with pytest.raises(ConfigError, match=r"train.batch_size=6 does not divide by the data-parallel "
                                        r"size 4 \(8 devices, 2 per data replica under "
                                        r"parallel.strategy=layers\): use a multiple of 4 "
                                        r"\(e.g. 4 or 8\), or set parallel.data to one of 1, 2, 3"):
    make(1, {"train.batch_size": 6}, model=1)
  layout = make(4, model=4)
  with pytest.raises(ConfigError, match="parallel.model=4 must divide the target vocabulary size "
                                        "50 .* use one of 1, 2"):
    layout.place(model.init_params(jax.random.PRNGKey(0), CFG.model, 20, 50))
  with pytest.raises(ConfigError, match="4 layer stages, but the model has 2 layers"):
    layout.place(model.init_params(
        jax.random.PRNGKey(0), ModelConfig(num_layers=2, hidden_size=8, embed_size=8), 20, 48))
  with pytest.raises(ConfigError, match="optim.name='adafactor' does not work with "
                                        "parallel.strategy=layers"):
    train.make_steps(override(CFG, {"optim.name": "adafactor"}), TX, layout)
  layout.check_optimizer(OptimConfig(name="adam"))  # elementwise: fine
