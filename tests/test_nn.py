"""The Flax modules (s2s_jax.nn) against the pure functions: numbers, parameters, search."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2s_jax import checkpoint, decode, model, nn
from s2s_jax import config as config_lib
from s2s_jax.config import ModelConfig
from s2s_jax.data import pipeline
from s2s_jax.data.vocab import EOS_ID, SPECIALS, Vocab

CFG = ModelConfig(num_layers=2, hidden_size=16, embed_size=8, init_scale=0.3, kernels="plain")
VS, VT = 20, 19
SRC_BxS = jnp.array([[5, 6, 7, 8, 9], [7, 4, 0, 0, 0], [11, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
TGT_BxT = jnp.array([[4, 5, EOS_ID, 0], [6, 7, 8, EOS_ID], [EOS_ID, 0, 0, 0], [0, 0, 0, 0]])
MAX_LEN = 8


def shapes(cfg=CFG):
  """model.init_params' pytree of ShapeDtypeStructs."""
  return jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg, VS, VT))


def params(seed=0):
  """Parameters of model.init_params' shapes, U(-0.3, 0.3) from numpy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.uniform(-0.3, 0.3, x.shape), jnp.float32),
                      shapes())


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_init_is_model_init_params_for_the_key_drawn():
  key = nnx.Rngs(3).params()
  ref = jax.jit(model.init_params, static_argnums=(1, 2, 3))(key, CFG, VS, VT)
  assert_trees_equal(nn.Seq2Seq(CFG, VS, VT, rngs=nnx.Rngs(3)).as_params(), ref)
  enc, dec = nn.Encoder(CFG, VS, rngs=nnx.Rngs(3)), nn.Decoder(CFG, VT, rngs=nnx.Rngs(3))
  assert_trees_equal(enc.as_params(), {n: ref[n] for n in ("src_embed", "encoder")})
  assert_trees_equal(dec.as_params(), {n: ref[n] for n in ("tgt_embed", "decoder", "softmax")})
  # A second module from the same Rngs draws the next key: other values.
  rngs = nnx.Rngs(3)
  first, second = nn.Encoder(CFG, VS, rngs=rngs), nn.Encoder(CFG, VS, rngs=rngs)
  assert not np.array_equal(first.embed[...], second.embed[...])


def test_parameter_trees_convert_both_ways_losslessly():
  p = params(1)
  state = nn.to_flax(p)
  assert state["encoder"]["embed"][...] is p["src_embed"]
  assert state["encoder"]["layers"][1]["w_h"][...] is p["encoder"][1]["w_h"]
  assert state["decoder"]["softmax"]["b"][...] is p["softmax"]["b"]
  assert_trees_equal(nn.from_flax(state), p)
  assert_trees_equal(nn.from_flax(nnx.to_pure_dict(state)), p)
  # The layout is a Seq2Seq's: its own state converts, and nnx.update loads a converted one.
  m = nn.Seq2Seq(CFG, VS, VT, rngs=nnx.Rngs(0))
  graphdef, own = nnx.split(m)
  assert jax.tree.structure(own) == jax.tree.structure(state)
  assert_trees_equal(nn.from_flax(own), m.as_params())
  nnx.update(m, state)
  assert_trees_equal(m.as_params(), p)
  assert_trees_equal(nnx.merge(graphdef, state).as_params(), p)
  assert_trees_equal(nn.Seq2Seq.from_params(CFG, p).as_params(), p)
  enc = nn.Encoder.from_params(CFG, p)
  assert_trees_equal(enc.as_params(), {n: p[n] for n in ("src_embed", "encoder")})
  assert_trees_equal(nn.from_flax({"encoder": nnx.state(enc), "decoder": state["decoder"]}), p)


def test_parameters_of_another_config_are_refused_with_the_entry_named():
  p = shapes(ModelConfig(num_layers=1, hidden_size=16, embed_size=8))
  with pytest.raises(ValueError, match=r"params\['decoder'\]\[1\]\['b'\]: absent"):
    nn.Seq2Seq.from_params(CFG, p)
  wide = shapes(ModelConfig(num_layers=2, hidden_size=32, embed_size=8))
  wrong = r"params\['softmax'\]\['w'\]: \(32, 19\), where .* gives \(16, 19\)$"
  with pytest.raises(ValueError, match=wrong):
    nn.Decoder.from_params(CFG, {**params(), "softmax": wide["softmax"]})
  with pytest.raises(ValueError, match="Seq2Seq: no decoder/layers, decoder/softmax$"):
    nn.from_flax({"encoder": nn.to_flax(params())["encoder"], "decoder": {"embed": 0}})


def test_outputs_and_gradients_equal_the_pure_functions():
  cfg = dataclasses.replace(CFG, kernels="cpu")  # hand-written backward passes (plain elsewhere)
  p = params(2)
  batch = {"src": SRC_BxS, "tgt": TGT_BxT}
  y_prev_B = jnp.array([2, 5, 7, 3])

  def pure(p):
    state = model.encode(p, SRC_BxS, cfg)
    h_TxBxH = model.decode_hidden(p, state, TGT_BxT, cfg)
    step = model.decoder_step(p, state, y_prev_B, cfg)
    grads = jax.grad(lambda q: model.loss_fn(q, batch, cfg)[0])(p)
    return (state, jnp.swapaxes(model.project(p, h_TxBxH, cfg), 0, 1), step,
            model.token_log_probs(p, batch, cfg), model.loss_fn(p, batch, cfg), grads)

  def flax(m):
    state = m.encode(SRC_BxS)
    grads = nnx.grad(lambda m: m.loss(SRC_BxS, TGT_BxT)[0])(m)
    return (state, m.decoder(state, TGT_BxT), m.step(state, y_prev_B), m(SRC_BxS, TGT_BxT),
            m.loss(SRC_BxS, TGT_BxT), nn.from_flax(grads))

  want, got = jax.jit(lambda p, m: (pure(p), flax(m)))(p, nn.Seq2Seq.from_params(cfg, p))
  assert_trees_equal(got, want)
  assert float(want[4][0]) > 0 and np.all(np.asarray(want[3])[TGT_BxT != 0] < 0)


def test_beam_search_through_the_module_equals_decode_beam():
  p = params(4)

  caps_B = decode.output_caps(np.sum(np.asarray(SRC_BxS) != 0, axis=1), 1.5, 10, MAX_LEN)

  @jax.jit
  def flax_beam(m):
    return decode.beam_search(m.step, m.encode(SRC_BxS), caps_B, beam_size=3, nbest=2,
                              max_len=MAX_LEN)

  hyps = flax_beam(nn.Seq2Seq.from_params(CFG, p))
  want = decode.beam(p, SRC_BxS, caps_B, cfg=CFG, beam_size=3, nbest=2, max_len=MAX_LEN)
  assert_trees_equal(tuple(hyps), tuple(want))
  tok_BxNxT = np.asarray(want.tokens_BxNxT)
  assert np.all(np.isfinite(want.scores_BxN[:3])) and np.any(tok_BxNxT[:, 0] != tok_BxNxT[:, 1])


class Classifier(nnx.Module):
  """A user's model: the paper's encoder under a linear head on its top layer's last h."""

  def __init__(self, cfg: ModelConfig, vocab: int, classes: int, *, rngs: nnx.Rngs):
    self.encoder = nn.Encoder(cfg, vocab, rngs=rngs)
    self.head = nnx.Linear(cfg.hidden_size, classes, rngs=rngs)

  def __call__(self, src_BxS: jax.Array) -> jax.Array:
    return self.head(self.encoder(src_BxS).h_LxBxH[-1])


def xent(logits_BxC, labels_B):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_BxC), labels_B[:, None], 1))


def test_encoder_inside_a_user_module_under_jit_and_grad():
  labels_B = jnp.array([0, 2, 1, 1])
  clf = Classifier(CFG, VS, 3, rngs=nnx.Rngs(5))
  loss, grads = jax.jit(jax.value_and_grad(lambda m: xent(m(SRC_BxS), labels_B)))(clf)
  assert isinstance(grads, Classifier)

  def ref(enc_params, head):  # the same model with the pure encoder
    return xent(head(model.encode(enc_params, SRC_BxS, CFG).h_LxBxH[-1]), labels_B)
  ref_loss, (g_enc, g_head) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(
      clf.encoder.as_params(), clf.head)
  assert_trees_equal((loss, grads.encoder.as_params(), nnx.state(grads.head)),
                     (ref_loss, g_enc, nnx.state(g_head)))
  assert float(jnp.abs(g_enc["encoder"][0]["w_h"]).sum()) > 0


def write_workdir(workdir: str, p, step: int) -> config_lib.Config:
  """A WORKDIR as training leaves it: config.json, the vocabularies, a checkpoint of `p`."""
  cfg = config_lib.Config(model=CFG)
  config_lib.save_json(cfg, os.path.join(workdir, "config.json"))
  for name, size in ((pipeline.SRC_VOCAB_FILE, VS), (pipeline.TGT_VOCAB_FILE, VT)):
    words = [f"w{i}" for i in range(size - len(SPECIALS))]
    Vocab(list(SPECIALS) + words).save(os.path.join(workdir, name))
  mngr = checkpoint.manager(workdir)
  state = {"params": p, "opt_state": jax.tree.map(jnp.zeros_like, p), "step": jnp.int32(step)}
  checkpoint.save(mngr, step, state, {"epoch": 0, "index": 0, "seed": 0})
  mngr.wait_until_finished()
  return cfg


def test_a_trained_workdir_loads_into_the_modules(tmp_path):
  p = params(6)
  cfg = write_workdir(str(tmp_path), p, 7)
  m, got_cfg, src_vocab, tgt_vocab, step = nn.from_workdir(str(tmp_path))
  assert (got_cfg, len(src_vocab), len(tgt_vocab), step) == (cfg, VS, VT, 7)
  assert_trees_equal(m.as_params(), p)
  # The trained encoder goes into a user's module.
  clf = Classifier(CFG, VS, 3, rngs=nnx.Rngs(0))
  clf.encoder = nn.Encoder.from_params(got_cfg.model, p)
  assert_trees_equal(clf.encoder.as_params(), {n: p[n] for n in ("src_embed", "encoder")})
