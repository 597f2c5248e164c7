"""The switches beyond the paper in the model: attention (every score), input feeding, the
bidirectional encoder, dropout and label smoothing, against references written as the papers'
equations, and their invariances."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from test_model import SENTS, batch_of

from s2s_jax import lstm, model, train
from s2s_jax.config import ConfigError, ModelConfig
from s2s_jax.data.vocab import BOS_ID

BASE = ModelConfig(num_layers=2, hidden_size=8, embed_size=6, init_scale=0.3,
                   attention_positions=7, kernels="plain")
SRC_V, TGT_V = 12, 11
# (attention, input feeding, encoder): every score, both decoder paths, both encoders.
VARIANTS = [("general", True, "uni"), ("concat", False, "bi"), ("location", True, "uni"),
            ("additive", False, "uni"), ("additive", True, "bi")]  # dot: see the equal scores


def variant(att, feed, enc, **kw):
  return dataclasses.replace(BASE, attention=att, input_feeding=feed, encoder=enc, **kw)


log_probs = jax.jit(model.token_log_probs, static_argnames=("cfg", "pick"))


def switches(rng=None, first_row=0, label_smoothing=0.0):
  kw = {"label_smoothing": label_smoothing} if label_smoothing else {}
  return kw if rng is None else dict(kw, rng=rng, first_row=first_row)


@functools.partial(jax.jit, static_argnames=("cfg", "label_smoothing"))
def loss(p, batch, cfg, **kw):
  return model.loss_fn(p, batch, cfg, **switches(**kw))


@functools.partial(jax.jit, static_argnames=("cfg",))
def loss_and_grads(p, batch, cfg, **kw):
  return jax.value_and_grad(lambda q: model.loss_fn(q, batch, cfg, **switches(**kw)),
                            has_aux=True)(p)


def params_for(cfg, seed=0, dtype=jnp.float32):
  p = model.init_params(jax.random.PRNGKey(seed), cfg, SRC_V, TGT_V)
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), p)


# ---------------------------------------------------------------------------------------------
# A reference: one sentence at a time, every step a Python loop, written from the equations.

def reference_log_probs(p, src, tgt, cfg):
  """log p(y_t | x, y_<t) of one sentence (lists of ids) under the attention model."""
  h_size, layers = cfg.hidden_size, cfg.num_layers
  run = lambda w, x, h, c: lstm.cell(w["w_h"], x @ w["w_x"] + w["b"], h, c)
  zeros = lambda n: jnp.zeros((n,), p["src_embed"].dtype)
  h, c = [zeros(h_size)] * layers, [zeros(h_size)] * layers
  xs = [p["src_embed"][w] for w in src]
  first = 0
  if cfg.encoder == "bi":  # layer 0: h_size/2 cells a direction, outputs concatenated
    half = h_size // 2
    hf = cf = hb = cb = zeros(half)
    fwd, bwd = [], []
    for x in xs:
      hf, cf = run(p["encoder"][0]["fwd"], x, hf, cf)
      fwd.append(hf)
    for x in xs[::-1]:
      hb, cb = run(p["encoder"][0]["bwd"], x, hb, cb)
      bwd.append(hb)
    xs = [jnp.concatenate([f, b]) for f, b in zip(fwd, bwd[::-1])]
    h[0], c[0] = jnp.concatenate([hf, hb]), jnp.concatenate([cf, cb])
    first = 1
  for i in range(first, layers):
    outs = []
    for x in xs:
      h[i], c[i] = run(p["encoder"][i], x, h[i], c[i])
      outs.append(h[i])
    xs = outs
  hs_SxH = jnp.stack(xs)
  att = p["attention"]

  def weights(q):
    if cfg.attention == "dot":
      e = hs_SxH @ q
    elif cfg.attention == "general":
      e = jnp.stack([q @ (att["w_a"].T @ hs) for hs in hs_SxH])  # h_t^T W h_s
    elif cfg.attention == "location":
      e = (q @ att["w_a"])[:len(src)]
    else:  # concat and additive: v^T tanh(W [q; h_s])
      w = jnp.concatenate([att["w_q"], att["w_k"]])
      e = jnp.stack([jnp.tanh(jnp.concatenate([q, hs]) @ w) @ att["v"] for hs in hs_SxH])
    return jax.nn.softmax(e)

  out, prev, feed = [], BOS_ID, zeros(h_size)
  for y in tgt:
    x = p["tgt_embed"][prev]
    if cfg.attention == "additive":  # Bahdanau: context from the state before the step
      ctx = weights(h[-1]) @ hs_SxH
      x = jnp.concatenate([x, ctx])
    if cfg.input_feeding:
      x = jnp.concatenate([x, feed])
    for i in range(layers):
      h[i], c[i] = run(p["decoder"][i], x, h[i], c[i])
      x = h[i]
    if cfg.attention != "additive":
      ctx = weights(h[-1]) @ hs_SxH
    feed = jnp.tanh(jnp.concatenate([ctx, h[-1]]) @ att["w_c"])
    logp = jax.nn.log_softmax(feed @ p["softmax"]["w"] + p["softmax"]["b"])
    out.append(logp[y])
    prev = y
  return jnp.stack(out)


@pytest.mark.parametrize("att,feed,enc", VARIANTS)
def test_log_probs_equal_the_reference(att, feed, enc):
  cfg = variant(att, feed, enc)
  with jax.enable_x64(True):
    p = params_for(cfg, 1, jnp.float64)
    batch = batch_of(SENTS, src_len=7, tgt_len=6, extra_rows=1)  # padding and an empty row
    lp_BxT = log_probs(p, batch, cfg)
    for i, (x, y) in enumerate(SENTS):
      np.testing.assert_allclose(lp_BxT[i, :len(y)], reference_log_probs(p, x, y, cfg),
                                 rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(lp_BxT[len(SENTS)]) == 0.0)


@pytest.mark.parametrize("att,feed,enc", [("general", True, "bi"), ("additive", False, "uni")])
def test_gradients_match_finite_differences(att, feed, enc):
  """Both decoder paths: layer-major with attention after it, and the scan over steps."""
  cfg = variant(att, feed, enc)
  with jax.enable_x64(True):
    p = params_for(cfg, 2, jnp.float64)
    batch = batch_of(SENTS[:2])
    loss = jax.jit(lambda q: model.loss_fn(q, batch, cfg)[0])
    check_grads(loss, (p,), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(jax.grad(loss)(p)["attention"]["w_c"]))) > 1e-3


def test_equal_scores_attend_to_the_mean_of_the_source_words():
  rng = np.random.default_rng(0)
  values_SxBxH = jnp.asarray(rng.normal(size=(5, 3, 8)), jnp.float32)
  lengths = [5, 2, 1]
  mask_SxBx1 = jnp.asarray([[[float(s < n)] for n in lengths] for s in range(5)])
  q_BxH = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  for att in ("dot", "general", "concat", "location", "additive"):
    cfg = variant(att, False, "uni")
    params = params_for(cfg)["attention"]
    # scores that do not depend on the source position: a zero query or zero score weights
    params = {k: (jnp.zeros_like(v) if k in ("w_a", "v") else v) for k, v in params.items()}
    keys = values_SxBxH if att == "dot" else values_SxBxH @ params.get("w_a", params.get("w_k"))
    q = jnp.zeros_like(q_BxH) if att == "dot" else q_BxH
    mem = model.Memory(values_SxBxH, keys, mask_SxBx1)
    c_BxH, a_BxS = jax.jit(model.attend, static_argnames="cfg")(params, q, mem, cfg)
    for b, n in enumerate(lengths):
      np.testing.assert_allclose(c_BxH[b], np.mean(values_SxBxH[:n, b], axis=0), rtol=1e-6,
                                 atol=1e-6)
      np.testing.assert_allclose(a_BxS[b], [1.0 / n] * n + [0.0] * (5 - n), rtol=1e-6)


def test_location_weighs_only_its_positions():
  cfg = variant("location", False, "uni", attention_positions=3)
  p = params_for(cfg)
  mem = model.Memory(jnp.ones((5, 2, 8)), jnp.ones((5, 2, 8)), jnp.ones((5, 2, 1)))
  _, a_BxS = model.attend(p["attention"], jnp.ones((2, 8)), mem, cfg)
  assert np.all(np.asarray(a_BxS[:, 3:]) == 0.0) and np.allclose(np.sum(a_BxS, axis=1), 1.0)


@pytest.mark.parametrize("att,feed,enc", [("general", True, "bi"), ("concat", False, "uni")])
def test_padding_and_batch_do_not_change_log_probs(att, feed, enc):
  cfg = variant(att, feed, enc)
  p = params_for(cfg, 3)
  order = [2, 0, 1]
  big = batch_of([SENTS[i] for i in order], src_len=11, tgt_len=9, extra_rows=2)
  lp = log_probs(p, big, cfg)
  for row, i in enumerate(order):
    alone = log_probs(p, batch_of([SENTS[i]], src_len=5, tgt_len=5), cfg)  # one shape
    n = len(SENTS[i][1])
    np.testing.assert_allclose(lp[row, :n], alone[0, :n], rtol=1e-5, atol=1e-6)


def test_bad_switch_values_are_config_errors():
  for kw, message in ((dict(attention="local"), "'local' for model.attention: allowed: one of"),
                      (dict(encoder="deep"), "'deep' for model.encoder: allowed: uni or bi"),
                      (dict(dropout=1.0), r"1.0 for model.dropout: allowed: .* in \[0, 1\)"),
                      (dict(input_feeding=True), "True for model.input_feeding: allowed: true or "
                                                 "false .true needs model.attention."),
                      (dict(encoder="bi", hidden_size=7), "bi needs an even model.hidden_size")):
    with pytest.raises(ConfigError, match=message):
      dataclasses.replace(BASE, **kw)


def test_switches_off_add_no_parameters():
  paper = model.init_params(jax.random.PRNGKey(0), BASE, SRC_V, TGT_V)
  assert set(paper) == {"src_embed", "tgt_embed", "encoder", "decoder", "softmax"}
  on = model.init_params(jax.random.PRNGKey(0), variant("general", True, "bi"), SRC_V, TGT_V)
  assert on["decoder"][0]["w_x"].shape == (6 + 8, 32) and set(on["encoder"][0]) == {"fwd", "bwd"}
  assert on["encoder"][0]["fwd"]["w_h"].shape == (4, 16)
  for name in ("src_embed", "tgt_embed", "softmax"):  # the same draws as the paper's model
    jax.tree_util.tree_map(np.testing.assert_array_equal, on[name], paper[name])


# ---------------------------------------------------------------------------------------------
# Dropout and label smoothing.

DROP = dataclasses.replace(BASE, dropout=0.3)
KEY = jax.random.PRNGKey(7)


def test_dropout_zero_is_no_dropout_bit_for_bit():
  cfg = variant("general", True, "bi")
  p = params_for(cfg, 4)
  batch = batch_of(SENTS, extra_rows=1)
  ((loss0, _), grads), ((loss_k, _), grads_k) = (loss_and_grads(p, batch, cfg),
                                                 loss_and_grads(p, batch, cfg, rng=KEY))
  assert float(loss0) == float(loss_k)
  jax.tree_util.tree_map(np.testing.assert_array_equal, grads, grads_k)
  on = dataclasses.replace(cfg, dropout=0.3)
  assert float(loss(p, batch, on, rng=KEY)[0]) != float(loss0)
  # the train step of a dropout=0 config passes no key at all: the paper's program
  p = params_for(BASE)
  tx = optax.sgd(0.1)
  state = train.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))
  text = lambda c: jax.jit(lambda s, b: train.train_step(s, b, cfg=c, tx=tx, seed=3)).lower(
      state, batch).as_text()
  assert "threefry" not in text(BASE) and "threefry" in text(DROP)


def test_dropout_masks_follow_the_global_row():
  """A batch split by rows (as the parallel layouts split it) draws the same masks."""
  cfg = dataclasses.replace(variant("general", True, "uni"), dropout=0.3)
  p = params_for(cfg, 5)
  batch = batch_of(SENTS + SENTS[:1])
  nll = lambda b, **kw: loss(p, b, cfg, rng=KEY, **kw)[1]["nll_sum"]
  whole = nll(batch)
  halves = [nll({k: v[r:r + 2] for k, v in batch.items()}, first_row=r) for r in (0, 2)]
  np.testing.assert_allclose(float(whole), float(sum(halves)), rtol=1e-6)
  other = nll({k: v[2:] for k, v in batch.items()})
  assert float(other) != float(halves[1])


def test_dropout_rate_and_scale():
  drop = model.dropout_fn(0.3, model.row_keys(KEY, 50))
  x_TxBxD = jnp.ones((20, 50, 100))
  y = np.asarray(drop(5, x_TxBxD))
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.7)}
  assert abs(np.mean(y == 0.0) - 0.3) < 0.01
  assert np.any(y != np.asarray(drop(6, x_TxBxD)))  # each site its own masks


def test_stepwise_and_layer_major_decoders_agree_under_dropout(monkeypatch):
  cfg = dataclasses.replace(variant("general", False, "uni"), dropout=0.3)
  p = params_for(cfg, 6)
  batch = batch_of(SENTS)
  keys = model.row_keys(KEY, 3)
  run = jax.jit(lambda keys: model.token_log_probs(p, batch, cfg, keys_B=keys))
  layer_major = run(keys)
  monkeypatch.setattr(model, "stepwise", lambda cfg: True)
  step_by_step = jax.jit(lambda keys: model.token_log_probs(p, batch, cfg, keys_B=keys))(keys)
  np.testing.assert_allclose(step_by_step, layer_major, rtol=1e-5, atol=1e-6)
  assert np.any(np.asarray(layer_major) != np.asarray(log_probs(p, batch, cfg)))


def test_no_dropout_when_evaluating():
  p = params_for(DROP, 7)
  batch = batch_of(SENTS)
  on, off = (jax.jit(functools.partial(train.eval_step, cfg=c))(p, batch) for c in (DROP, BASE))
  assert float(on["nll_sum"]) == float(off["nll_sum"])


def test_label_smoothing_is_optax_smoothed_cross_entropy():
  cfg = variant("dot", False, "uni")
  p = params_for(cfg, 8)
  batch = batch_of(SENTS, extra_rows=1)
  smoothed, aux = loss(p, batch, cfg, label_smoothing=0.1)
  _, plain = loss(p, batch, cfg)
  outputs = jax.jit(model.decoder_outputs, static_argnames="cfg")
  logp_TxBxV = jax.nn.log_softmax(model.project(p, outputs(p, batch, cfg), cfg))
  tgt_TxB = np.asarray(batch["tgt"]).T
  by_hand = 0.0
  for t, b in zip(*np.nonzero(tgt_TxB)):
    by_hand -= 0.9 * logp_TxBxV[t, b, tgt_TxB[t, b]] + 0.1 * np.mean(logp_TxBxV[t, b])
  np.testing.assert_allclose(float(smoothed), by_hand / 3, rtol=1e-5)
  np.testing.assert_allclose(float(aux["nll_sum"]), float(plain["nll_sum"]), rtol=1e-6)
  np.testing.assert_allclose(float(aux["loss_sum"]), by_hand, rtol=1e-5)


def test_cpu_kernels_compute_the_same_attention_model():
  """model.kernels=cpu (the default on a CPU) runs the encoder, the layer-major decoder and the
  softmax loss through the hand-written backward passes: the same loss and gradients."""
  plain = variant("general", False, "bi")
  cpu = dataclasses.replace(plain, kernels="cpu")
  p = params_for(plain, 9)
  batch = batch_of(SENTS, extra_rows=1)
  (loss_p, _), grads_p = loss_and_grads(p, batch, plain)
  (loss_c, _), grads_c = loss_and_grads(p, batch, cpu)
  np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         grads_c, grads_p)
