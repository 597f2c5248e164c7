"""Search and scoring with attention models: batch invariance, agreement with teacher forcing,
the attention weights the search returns, ensembles whose members differ."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import B_, ROWS, SRC_V, TGT_V, A, N, T, W, as_seq, caps, pad, sources

from s2s_jax import decode, ensemble, model
from s2s_jax.config import DecodeConfig, ModelConfig
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID

ATT = ModelConfig(num_layers=2, hidden_size=16, embed_size=8, init_scale=0.5,
                  attention="general", input_feeding=True, encoder="bi")
PLAIN = dataclasses.replace(ATT, attention="none", input_feeding=False, encoder="uni")
ADDITIVE = dataclasses.replace(ATT, attention="additive", input_feeding=False, num_layers=1,
                               hidden_size=12)


def make_params(cfg, seed):
  """model.init_params' structure, U(-s, s) from numpy, </s> made less likely."""
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg, SRC_V, TGT_V))
  rng = np.random.default_rng(seed)
  p = jax.tree_util.tree_map(lambda x: rng.uniform(-0.5, 0.5, x.shape).astype(np.float32), like)
  p["softmax"]["b"][EOS_ID] -= 1.5
  return p


def beam(p, src, cfg=ATT, max_len=T, **kw):
  kw = {"beam_size": W, "nbest": N, **kw}
  return jax.device_get(decode.beam(p, src, caps(src, max_len), cfg=cfg, max_len=max_len, **kw))


def greedy(p, src, cfg=ATT, max_len=T, **kw):
  return jax.device_get(decode.greedy(p, src, caps(src, max_len), cfg=cfg, max_len=max_len, **kw))


teacher_forced = jax.jit(lambda p, src, tgt, cfg: model.token_log_probs(
    p, {"src": src, "tgt": tgt}, cfg), static_argnums=3)


@jax.jit
def teacher_forced_weights(p, src_BxS, tgt_BxT):
  """The attention weights at every target position, BxTxS, by teacher forcing."""
  top, state = model.run_encoder(p, src_BxS, ATT)
  _, a_TxBxS = model.attention_hidden(p, model.memory(p, top, src_BxS, ATT), state, tgt_BxT, ATT)
  return jnp.swapaxes(a_TxBxS, 0, 1)


@pytest.fixture(scope="module")
def params():
  return make_params(ATT, 0)


@pytest.fixture(scope="module")
def shared(params):
  srcs = sources()
  src = pad(srcs)
  return {"srcs": srcs, "src": src, "beam": beam(params, src, alignment=True),
          "greedy": greedy(params, src, alignment=True)}


def test_outputs_are_not_trivial(shared):
  lengths = {len(as_seq(t)) for t in shared["greedy"][0]}
  assert len(lengths) >= 3 and max(lengths) >= 4


def test_beam_scores_are_teacher_forced_scores_and_beam_one_is_greedy(params, shared):
  hyp, (tok, lp, _) = shared["beam"], shared["greedy"]
  for k in range(N):
    tgt = hyp.tokens_BxNxT[:, k]
    np.testing.assert_allclose(hyp.log_probs_BxN[:, k],
                               teacher_forced(params, shared["src"], tgt, ATT).sum(1), rtol=1e-5)
    np.testing.assert_allclose(decode.score(params, shared["src"], tgt, cfg=ATT),
                               hyp.log_probs_BxN[:, k], rtol=1e-5)
  one = beam(params, shared["src"], beam_size=1, nbest=1)
  np.testing.assert_array_equal(one.tokens_BxNxT[:, 0], tok)
  np.testing.assert_allclose(one.scores_BxN[:, 0], lp, rtol=1e-5, atol=1e-5)
  assert one.attention_BxNxTxS is None  # only when asked
  assert np.all(hyp.scores_BxN[:, 0] >= lp - 1e-5)


def test_returned_weights_are_those_of_the_returned_hypotheses(params, shared):
  src, hyp, (tok, _, att_BxTxS) = shared["src"], shared["beam"], shared["greedy"]
  plain = beam(params, src)  # asking for the weights changes nothing else
  np.testing.assert_array_equal(plain.tokens_BxNxT, hyp.tokens_BxNxT)
  np.testing.assert_array_equal(plain.scores_BxN, hyp.scores_BxN)
  lengths = (src != PAD_ID).sum(1)
  for k in range(N):
    tgt = hyp.tokens_BxNxT[:, k]
    want = teacher_forced_weights(params, src, tgt)
    for b in range(ROWS):
      n = len(as_seq(tgt[b]))  # </s> included
      np.testing.assert_allclose(hyp.attention_BxNxTxS[b, k, :n], want[b, :n], atol=1e-5)
      np.testing.assert_allclose(hyp.attention_BxNxTxS[b, k, :n].sum(1), 1.0, rtol=1e-5)
      assert np.all(hyp.attention_BxNxTxS[b, k, :n, lengths[b]:] == 0.0)  # never on padding
  want = teacher_forced_weights(params, src, tok)
  for b in range(ROWS):
    n = len(as_seq(tok[b]))
    np.testing.assert_allclose(att_BxTxS[b, :n], want[b, :n], atol=1e-5)


def test_batch_invariance(params, shared):
  srcs, ref, ref_g = shared["srcs"], shared["beam"], shared["greedy"]
  perm = np.random.default_rng(0).permutation(ROWS)
  big_src = pad([srcs[i] for i in perm], rows=13, length=21)
  big, big_g = beam(params, big_src, max_len=36), greedy(params, big_src, max_len=36)
  for j, i in enumerate(perm):
    np.testing.assert_array_equal(big.tokens_BxNxT[j, :, :T], ref.tokens_BxNxT[i])
    np.testing.assert_allclose(big.scores_BxN[j], ref.scores_BxN[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(big_g[0][j, :T], ref_g[0][i])
  alone = beam(params, pad([srcs[5]], rows=1))
  np.testing.assert_array_equal(alone.tokens_BxNxT[0], ref.tokens_BxNxT[5])


def test_translate_ids_returns_each_tokens_weights(params, shared):
  dcfg = DecodeConfig(beam_size=W, nbest=N, batch_size=ROWS, max_len_a=A, max_len_b=B_)
  out = decode.translate_ids(params, ATT, shared["srcs"], dcfg, alignment=True)
  hyp = shared["beam"]
  for i, nbest in enumerate(out):
    for k, h in enumerate(nbest):
      assert h.tokens == list(as_seq(hyp.tokens_BxNxT[i, k])[:-1])
      assert h.attention.shape == (len(h.tokens), len(shared["srcs"][i]))
      want = hyp.attention_BxNxTxS[i, k, :len(h.tokens), :h.attention.shape[1]]
      np.testing.assert_array_equal(h.attention, want)
  assert decode.translate_ids(params, ATT, shared["srcs"][:1], dcfg)[0][0].attention is None


def test_weights_of_a_model_without_attention_are_an_error():
  with pytest.raises(ValueError, match="need a model trained with model.attention"):
    greedy(make_params(PLAIN, 0), pad(sources()), cfg=PLAIN, alignment=True)


# ---------------------------------------------------------------------------------------------
# Ensembles: members of one architecture are stacked, different ones run side by side.

def test_mixed_members_combine_like_the_rule(params, shared):
  members = (params, make_params(PLAIN, 1), make_params(ADDITIVE, 2))
  cfgs = (ATT, PLAIN, ADDITIVE)
  src = shared["src"]
  y_prev = jnp.array([BOS_ID, 5, 6, 7, 8, 9, 10, 11])
  step = jax.jit(lambda p, src, y, cfg: ensemble.decoder_step(p, ensemble.encode(p, src, cfg), y,
                                                              cfg)[0], static_argnums=3)
  logp = step(members, src, y_prev, cfgs)
  each = [np.float64(step(p, src, y_prev, c)) for p, c in zip(members, cfgs)]
  np.testing.assert_allclose(logp, np.log(sum(np.exp(x) for x in each) / 3), rtol=1e-5, atol=1e-6)
  hyp = beam(members, src, cfg=cfgs, alignment=True)
  for k in range(N):
    tgt = hyp.tokens_BxNxT[:, k]
    lps = [np.float64(teacher_forced(p, src, tgt, c)) for p, c in zip(members, cfgs)]
    by_hand = np.where(tgt != PAD_ID, np.log(sum(np.exp(x) for x in lps) / 3), 0.0).sum(1)
    np.testing.assert_allclose(hyp.log_probs_BxN[:, k], by_hand, rtol=1e-5)
    np.testing.assert_allclose(decode.score(members, src, tgt, cfg=cfgs), by_hand, rtol=1e-5)
  assert hyp.attention_BxNxTxS.shape[:2] == (ROWS, N)  # the mean over the attention members


def test_copies_and_stacks_of_an_attention_model_are_the_model(params, shared):
  src, ref = shared["src"], shared["beam"]
  for members, cfg in (((params, params), (ATT, ATT)), (ensemble.stack([params] * 2), ATT)):
    hyp = beam(members, src, cfg=cfg, alignment=True)
    np.testing.assert_array_equal(hyp.tokens_BxNxT, ref.tokens_BxNxT)
    np.testing.assert_allclose(hyp.scores_BxN, ref.scores_BxN, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hyp.attention_BxNxTxS, ref.attention_BxNxTxS, atol=1e-5)
