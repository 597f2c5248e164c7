"""The encoder-decoder: padding invariance, gradients, initialisation, the paper's loss."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from s2s_jax import model
from s2s_jax.config import ModelConfig
from s2s_jax.data.vocab import BOS_ID, EOS_ID

CFG = ModelConfig(num_layers=2, hidden_size=8, embed_size=6, init_scale=0.3)
SENTS = [([5, 6, 7, 8, 9], [4, 5, EOS_ID]), ([7, 4], [6, 7, 8, 9, EOS_ID]), ([9], [EOS_ID])]


def batch_of(pairs, src_len=None, tgt_len=None, extra_rows=0):
  s = src_len or max(len(p[0]) for p in pairs)
  t = tgt_len or max(len(p[1]) for p in pairs)
  src = np.zeros((len(pairs) + extra_rows, s), np.int32)
  tgt = np.zeros((len(pairs) + extra_rows, t), np.int32)
  for i, (x, y) in enumerate(pairs):
    src[i, :len(x)], tgt[i, :len(y)] = x, y
  return {"src": jnp.asarray(src), "tgt": jnp.asarray(tgt)}


def params(seed=0, cfg=CFG):
  return model.init_params(jax.random.PRNGKey(seed), cfg, 12, 11)


def test_padding_does_not_change_states_or_log_probs():
  p = params()
  padded = batch_of(SENTS, src_len=9, tgt_len=8, extra_rows=2)
  st = model.encode(p, padded["src"], CFG)
  lp = model.token_log_probs(p, padded, CFG)
  for i, pair in enumerate(SENTS):
    alone = batch_of([pair])
    st1 = model.encode(p, alone["src"], CFG)
    lp1 = model.token_log_probs(p, alone, CFG)
    np.testing.assert_allclose(st.h_LxBxH[:, i], st1.h_LxBxH[:, 0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(st.c_LxBxH[:, i], st1.c_LxBxH[:, 0], rtol=1e-6, atol=1e-7)
    n = len(pair[1])
    np.testing.assert_allclose(lp[i, :n], lp1[0], rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(lp[i, n:]) == 0.0)
  # The same one-sentence batch with more padding gives bit-identical results.
  alone, more = batch_of([SENTS[0]]), batch_of([SENTS[0]], src_len=12, tgt_len=10)
  np.testing.assert_array_equal(model.encode(p, alone["src"], CFG).h_LxBxH,
                                model.encode(p, more["src"], CFG).h_LxBxH)


def test_decoder_starts_from_encoder_state_and_bos():
  """Step-by-step decoding from encode()'s state reproduces the teacher-forced log-probs."""
  p = params(1)
  b = batch_of([SENTS[1]])
  lp = model.token_log_probs(p, b, CFG)[0]
  state = model.encode(p, b["src"], CFG)
  y_prev = jnp.array([BOS_ID])
  for t, y in enumerate(SENTS[1][1]):
    logp, state = model.decoder_step(p, state, y_prev, CFG)
    np.testing.assert_allclose(logp[0, y], lp[t], rtol=1e-5, atol=1e-6)
    y_prev = jnp.array([y])


def test_loss_is_summed_nll_over_sentences():
  p = params(2)
  b = batch_of(SENTS, extra_rows=1)  # an all-padding row counts for nothing
  loss, aux = model.loss_fn(p, b, CFG)
  lp = model.token_log_probs(p, b, CFG)
  assert int(aux["num_sents"]) == 3
  assert int(aux["num_tokens"]) == sum(len(t) for _, t in SENTS)
  np.testing.assert_allclose(loss, -np.sum(np.asarray(lp)) / 3, rtol=1e-6)


def test_embed_rows_and_their_gradient():
  table_VxE = jnp.arange(12.0).reshape(4, 3)
  ids_BxT = jnp.array([[1, 3], [1, 0]])
  x_BxTxE = model.embed(table_VxE, ids_BxT)
  np.testing.assert_array_equal(x_BxTxE, np.asarray(table_VxE)[np.asarray(ids_BxT)])
  # The gradient adds up every position's cotangent in its id's row; id 2 gets none.
  w_BxTxE = jnp.arange(1.0, 13.0).reshape(2, 2, 3)
  g = jax.grad(lambda t: jnp.sum(model.embed(t, ids_BxT) * w_BxTxE))(table_VxE)
  np.testing.assert_array_equal(g, [[10, 11, 12], [1 + 7, 2 + 8, 3 + 9], [0, 0, 0], [4, 5, 6]])
  # Ids are in range by construction; one that is not is clipped, not turned into NaN.
  clipped_2xE = model.embed(table_VxE, jnp.array([7, -1]))
  np.testing.assert_array_equal(clipped_2xE, np.asarray(table_VxE)[[3, 0]])


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    p = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params(3))
    b = batch_of(SENTS[:2])
    f = lambda q: model.loss_fn(q, b, CFG)[0]
    check_grads(f, (p,), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_every_parameter_starts_in_range():
  p = params(4, ModelConfig(num_layers=3, hidden_size=16, embed_size=8))
  for x in jax.tree_util.tree_leaves(p):
    assert float(jnp.min(x)) >= -0.08 and float(jnp.max(x)) <= 0.08
    assert float(jnp.max(jnp.abs(x))) > 0.05  # really spread over the range, not tiny


def test_paper_model_has_384m_parameters():
  cfg = ModelConfig(num_layers=4, hidden_size=1000, embed_size=1000)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg, 160_000, 80_000))
  total = model.num_params(shapes)
  recurrent = model.num_params(shapes["encoder"]) + model.num_params(shapes["decoder"])
  assert round(total / 1e6) == 384 and round(recurrent / 1e6) == 64
  assert shapes["softmax"]["w"].shape == (1000, 80_000)
