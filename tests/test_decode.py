"""Search and scoring: exactness against brute force, greedy = beam 1, batch invariance,
n-best consistency with teacher forcing, ensembles."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import decode, ensemble, model
from s2s_jax.config import DecodeConfig, ModelConfig
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# ---------------------------------------------------------------------------------------------
# A hand-set language model: log p(y_t | y_<t) is an arbitrary table indexed by the whole prefix,
# one table per sentence. Vocabulary: <pad> <unk> <s> </s> a b (emittable: <unk> </s> a b).

V = 6
WORDS = (UNK_ID, 4, 5)  # the emittable non-</s> tokens
P = V ** 4  # prefix ids: base-V digits of <s> y_1 .. y_t, t <= 3


def random_tables(num: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 1.5, size=(num, P, V))
  logits[..., EOS_ID] += rng.normal(0.0, 1.0, size=(num, 1))  # some sentences like to stop early
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def table_search_inputs(tables: np.ndarray):
  """(step_fn, initial state with B rows) for the prefix-table model."""
  table = jnp.asarray(tables)

  def step(state_Rx2, y_prev_R):
    sent_R, prefix_R = state_Rx2[:, 0], state_Rx2[:, 1] * V + y_prev_R
    return table[sent_R, prefix_R], jnp.stack([sent_R, prefix_R], axis=1)

  state = jnp.stack([jnp.arange(len(tables)), jnp.zeros(len(tables), jnp.int32)], axis=1)
  return step, state


def brute_force(table: np.ndarray, cap: int, alpha: float = 0.0) -> list[tuple]:
  """Every sequence y_1..y_n </s> with n + 1 <= cap: (ranking score, log p, tokens), best first."""
  out = []
  for n in range(cap):
    for words in itertools.product(WORDS, repeat=n):
      seq, prefix, lp = words + (EOS_ID,), BOS_ID, 0.0
      for y in seq:
        lp += float(table[prefix, y])
        prefix = prefix * V + y
      rank = lp / ((5.0 + len(seq)) / 6.0) ** alpha if alpha else lp
      out.append((rank, lp, seq))
  return sorted(out, key=lambda x: -x[0])


def as_seq(tokens_T: np.ndarray) -> tuple:
  t = list(np.asarray(tokens_T))
  return tuple(t[:t.index(EOS_ID) + 1]) if EOS_ID in t else tuple(x for x in t if x != PAD_ID)


CAPS = np.array([4, 1, 3, 4, 2, 4, 4, 3], np.int32)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_is_exhaustive(alpha):
  """A beam holding every prefix returns the brute-force n-best, scores included."""
  tables = random_tables(len(CAPS), seed=1)
  step, state = table_search_inputs(tables)
  nbest = 5
  hyp = jax.jit(lambda s: decode.beam_search(step, s, jnp.asarray(CAPS), beam_size=40, nbest=nbest,
                                             max_len=4, length_penalty=alpha))(state)
  for b, cap in enumerate(CAPS):
    expected = brute_force(tables[b], int(cap), alpha)[:nbest]
    for k in range(nbest):
      if k < len(expected):
        rank, lp, seq = expected[k]
        assert as_seq(hyp.tokens_BxNxT[b, k]) == seq, (b, k)
        np.testing.assert_allclose(hyp.scores_BxN[b, k], rank, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hyp.log_probs_BxN[b, k], lp, rtol=1e-5, atol=1e-5)
      else:  # fewer sequences exist than n-best slots (cap 1: only "</s>")
        assert hyp.scores_BxN[b, k] == -np.inf and np.all(hyp.tokens_BxNxT[b, k] == PAD_ID)


@pytest.mark.parametrize("beam_size,nbest,alpha", [(3, 1, 0.0), (3, 3, 0.8)])
def test_stop_rule_loses_nothing(beam_size, nbest, alpha):
  """Stopping once no live hypothesis can beat the n-th complete one = running to the cap."""
  tables = random_tables(len(CAPS), seed=2)
  step, state = table_search_inputs(tables)
  run = lambda early: decode.beam_search(step, state, jnp.asarray(CAPS), beam_size=beam_size,
                                         nbest=nbest, max_len=4, length_penalty=alpha,
                                         early_stop=early)
  fast, full = run(True), run(False)
  np.testing.assert_array_equal(fast.tokens_BxNxT, full.tokens_BxNxT)
  np.testing.assert_allclose(fast.scores_BxN, full.scores_BxN, rtol=1e-6)
  assert int(full.steps) == 4
  for b, cap in enumerate(CAPS):  # never better than the exhaustive optimum
    assert fast.scores_BxN[b, 0] <= brute_force(tables[b], int(cap), alpha)[0][0] + 1e-5
  # the rule does stop early: one sentence (cap 3) whose first step gives "</s>" probability 1
  one = tables[2:3].copy()
  one[0, BOS_ID, EOS_ID] = 0.0
  step, state = table_search_inputs(one)
  hyp = decode.beam_search(step, state, jnp.array([3]), beam_size=2, nbest=1, max_len=3,
                           length_penalty=alpha)
  assert int(hyp.steps) == 1 and as_seq(hyp.tokens_BxNxT[0, 0]) == (EOS_ID,)


def test_greedy_search_is_beam_one_on_tables():
  tables = random_tables(len(CAPS), seed=3)
  step, state = table_search_inputs(tables)
  tok, lp = decode.greedy_search(step, state, jnp.asarray(CAPS), max_len=4)
  hyp = decode.beam_search(step, state, jnp.asarray(CAPS), beam_size=1, nbest=1, max_len=4)
  np.testing.assert_array_equal(hyp.tokens_BxNxT[:, 0], tok)
  np.testing.assert_allclose(hyp.scores_BxN[:, 0], lp, rtol=1e-6)
  # and greedy really is the step-by-step arg-max over the emittable tokens
  for b, cap in enumerate(CAPS):
    prefix, seq = BOS_ID, []
    while True:
      logp = tables[b, prefix].copy()
      logp[[PAD_ID, BOS_ID]] = -np.inf
      y = EOS_ID if len(seq) + 1 >= cap else int(np.argmax(logp))
      seq.append(y)
      prefix = prefix * V + y
      if y == EOS_ID:
        break
    assert as_seq(tok[b]) == tuple(seq)


def test_nbest_larger_than_beam_is_an_error():
  step, state = table_search_inputs(random_tables(1, 0))
  with pytest.raises(ValueError, match="nbest"):
    decode.beam_search(step, state, jnp.array([3]), beam_size=2, nbest=3, max_len=3)


# ---------------------------------------------------------------------------------------------
# The real model (tiny, random, with </s> made unlikely so outputs have a few words). Most
# tests share one batch shape (ROWS x S, max_len T) so that few programs get compiled.

CFG = ModelConfig(num_layers=2, hidden_size=16, embed_size=8, init_scale=0.5)
SRC_V, TGT_V = 30, 25
A, B_ = 1.5, 4  # max_len_a, max_len_b
ROWS, S = 8, decode.MIN_PADDED_LEN
T = decode.max_output_length(S, A, B_)  # translate_ids' max_len for S: the same compiled search
W, N = 3, 3  # beam size and n-best of the shared runs


def init_params(seed: int, tgt_vocab: int = TGT_V) -> model.Params:
  """Parameters of model.init_params' structure, U(-s, s) from numpy (nothing to compile)."""
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), CFG, SRC_V, tgt_vocab))
  rng = np.random.default_rng(seed)
  s = CFG.init_scale
  return jax.tree_util.tree_map(lambda x: rng.uniform(-s, s, x.shape).astype(np.float32), like)


def make_params(seed: int) -> model.Params:
  p = init_params(seed)
  p["softmax"]["b"][EOS_ID] -= 1.5
  return p


def sources(num: int = ROWS, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(4, SRC_V, size=rng.integers(1, 10)).tolist() for _ in range(num)]


def pad(srcs, rows=ROWS, length=S) -> np.ndarray:
  out = np.zeros((rows, length), np.int32)
  for i, s in enumerate(srcs):
    out[i, :len(s)] = s
  return out


def caps(src, max_len=T, a=A, b=B_):
  return decode.output_caps(np.sum(src != PAD_ID, axis=1), a, b, max_len)


def run_beam(p, src, beam_size=W, nbest=N, max_len=T):
  return jax.device_get(decode.beam(p, src, caps(src, max_len), cfg=CFG, max_len=max_len,
                                    beam_size=beam_size, nbest=nbest, length_penalty=0.0))


def run_greedy(p, src, max_len=T):
  return jax.device_get(decode.greedy(p, src, caps(src, max_len), cfg=CFG, max_len=max_len))


teacher_forced = jax.jit(
    lambda p, src, tgt: model.token_log_probs(p, {"src": src, "tgt": tgt}, CFG))
first_step = jax.jit(
    lambda p, src, y: ensemble.decoder_step(p, ensemble.encode(p, src, CFG), y, CFG)[0])


@pytest.fixture(scope="module")
def params():
  return make_params(0)


@pytest.fixture(scope="module")
def shared(params):
  """Greedy and beam (W, N) outputs of one batch."""
  srcs = sources()
  src = pad(srcs)
  return {"srcs": srcs, "src": src, "greedy": run_greedy(params, src),
          "beam": run_beam(params, src)}


def test_outputs_are_not_trivial(shared):
  """Guards the other tests: the tiny model emits sentences of several lengths."""
  lengths = {len(as_seq(t)) for t in shared["greedy"][0]}
  assert len(lengths) >= 3 and max(lengths) >= 4


def test_beam_one_equals_greedy(params, shared):
  tok, lp = shared["greedy"]
  hyp = run_beam(params, shared["src"], beam_size=1, nbest=1)
  np.testing.assert_array_equal(hyp.tokens_BxNxT[:, 0], tok)
  np.testing.assert_allclose(hyp.scores_BxN[:, 0], lp, rtol=1e-5, atol=1e-5)


def test_nbest_top_is_one_best_and_scores_match_teacher_forcing(params, shared):
  src, many = shared["src"], shared["beam"]
  one = run_beam(params, src, nbest=1)
  np.testing.assert_array_equal(many.tokens_BxNxT[:, 0], one.tokens_BxNxT[:, 0])
  np.testing.assert_allclose(many.scores_BxN[:, 0], one.scores_BxN[:, 0], rtol=1e-5)
  assert np.all(np.diff(many.scores_BxN, axis=1) <= 0) and np.all(np.isfinite(many.scores_BxN))
  np.testing.assert_array_equal(many.scores_BxN, many.log_probs_BxN)  # no length penalty
  for k in range(N):
    tf = teacher_forced(params, src, many.tokens_BxNxT[:, k]).sum(1)
    np.testing.assert_allclose(many.log_probs_BxN[:, k], tf, rtol=1e-5, atol=1e-5)
  for b in range(ROWS):  # distinct sequences, each ending in </s>
    assert len({as_seq(t) for t in many.tokens_BxNxT[b]}) == N
  # beam search finds better sentences than greedy here (and never worse ones)
  assert np.all(many.scores_BxN[:, 0] >= shared["greedy"][1] - 1e-5)
  assert np.any(many.scores_BxN[:, 0] > shared["greedy"][1] + 1e-3)


def test_batch_invariance(params, shared):
  """Each sentence gets the same hypotheses alone, shuffled, or padded differently."""
  srcs, ref, ref_g = shared["srcs"], shared["beam"], shared["greedy"]
  perm = np.random.default_rng(0).permutation(ROWS)
  big_src = pad([srcs[i] for i in perm], rows=13, length=21)  # more rows (empty) and padding
  big = run_beam(params, big_src, max_len=36)
  big_g = run_greedy(params, big_src, max_len=36)
  for j, i in enumerate(perm):
    np.testing.assert_array_equal(big.tokens_BxNxT[j, :, :T], ref.tokens_BxNxT[i])
    assert np.all(big.tokens_BxNxT[j, :, T:] == PAD_ID)
    np.testing.assert_allclose(big.scores_BxN[j], ref.scores_BxN[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(big_g[0][j, :T], ref_g[0][i])
    np.testing.assert_allclose(big_g[1][j], ref_g[1][i], rtol=1e-5, atol=1e-5)
  for i in (0, 5):  # alone
    alone = run_beam(params, pad([srcs[i]], rows=1))
    np.testing.assert_array_equal(alone.tokens_BxNxT[0], ref.tokens_BxNxT[i])
    np.testing.assert_allclose(alone.scores_BxN[0], ref.scores_BxN[i], rtol=1e-5, atol=1e-5)


def test_max_length_cap_and_no_pad_or_bos(params):
  """</s> impossible (and <pad>, <s> favoured): every output is cut at its cap, made of words."""
  b = params["softmax"]["b"].copy()
  b[EOS_ID], b[PAD_ID], b[BOS_ID] = -50.0, 9.0, 9.0
  p = dict(params, softmax=dict(params["softmax"], b=b))
  srcs = [[5], [6, 7, 8], [9] * 7, [10] * 9]
  hyp, (tok, _) = run_beam(p, pad(srcs)), run_greedy(p, pad(srcs))
  for i, s in enumerate(srcs):
    cap = min(math.floor(A * len(s)) + B_, T)
    for seq in [as_seq(tok[i])] + [as_seq(t) for t in hyp.tokens_BxNxT[i]]:
      assert len(seq) == cap and seq[-1] == EOS_ID and not {PAD_ID, BOS_ID} & set(seq)
  assert int(hyp.steps) == 17  # the longest cap, floor(1.5 * 9) + 4: the loop stops there
  # The caps the search gets are exact for any a: 1.3 * 90 is 117 (116.99999 in float32).
  srcs = [[5] * 90, [6] * 77, [7] * 10]
  dcfg = DecodeConfig(beam_size=1, max_len_a=1.3, max_len_b=0)
  out = decode.translate_ids(p, CFG, srcs, dcfg)
  assert [len(r[0].tokens) + 1 for r in out] == [117, 100, 13]  # words + </s>


def test_output_caps_are_exact_over_a_grid():
  """floor(a * |x|) + b with a the decimal number written, for a = 0, 0.01, ..., 3 and a few
  more, and |x| = 0..300 (an empty row: 1)."""
  from decimal import Decimal
  lengths = np.arange(301)
  grid = [f"{k / 100:.2f}" for k in range(301)] + ["1.15", "0.333", "2.675", "1e-05", "7.77"]
  float32_wrong = 0
  for text in grid:
    want = [max(1, math.floor(Decimal(text) * n) + 2) if n else 1 for n in range(301)]
    np.testing.assert_array_equal(decode.output_caps(lengths, float(text), 2, 10**6), want)
    f32 = np.floor(np.float32(text) * lengths.astype(np.float32)).astype(np.int64) + 2
    float32_wrong += int(np.sum(f32[1:] != np.asarray(want)[1:]))
  assert float32_wrong > 100  # the grid holds many cases that float32 gets wrong
  assert decode.max_output_length(90, 1.3, 0) == 117 and decode.max_output_length(10, 0.7, 0) == 7
  np.testing.assert_array_equal(decode.output_caps([0, 5, 9], 1.5, 4, 15), [1, 11, 15])


def test_translate_ids_order_empty_and_chunks(params, shared):
  """Host driver: input order restored, empty source -> empty output, chunking invisible."""
  srcs = sources(2 * ROWS + 1, seed=6)  # two full batches (the compiled shape of `shared`)
  srcs[3] = []
  dcfg = DecodeConfig(beam_size=W, nbest=N, batch_size=ROWS, max_len_a=A, max_len_b=B_)
  out = decode.translate_ids(params, CFG, srcs, dcfg)
  assert len(out) == len(srcs) and out[3] == [decode.Translation([], 0.0, 0.0)]
  for i in (0, 7, 10):
    alone = decode.translate_ids(params, CFG, [srcs[i]], dcfg)[0]
    assert [h.tokens for h in alone] == [h.tokens for h in out[i]]
    np.testing.assert_allclose([h.score for h in alone], [h.score for h in out[i]], rtol=1e-5)
  # the same sentences through the jitted search directly
  ref = shared["beam"]
  direct = decode.translate_ids(params, CFG, shared["srcs"], dcfg)
  for i, nbest in enumerate(direct):
    assert [h.tokens for h in nbest] == [list(as_seq(t)[:-1]) for t in ref.tokens_BxNxT[i]]
  # score_ids gives the same log-probabilities (</s> appended by it)
  pairs = [(srcs[i], h.tokens) for i in (0, 1, 2, 4) for h in out[i]]
  np.testing.assert_allclose(decode.score_ids(params, CFG, pairs, batch_size=ROWS),
                             [h.log_prob for i in (0, 1, 2, 4) for h in out[i]], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Ensembles: log of the mean of the members' distributions.

def test_ensemble_of_one_and_of_copies_equals_the_model(params, shared):
  src, base, base_g = shared["src"], shared["beam"], shared["greedy"]
  for members in ([params], [params, params]):
    stacked = ensemble.stack(members)
    assert ensemble.num_members(stacked) == len(members)
    hyp = run_beam(stacked, src)
    np.testing.assert_array_equal(hyp.tokens_BxNxT, base.tokens_BxNxT)
    np.testing.assert_allclose(hyp.scores_BxN, base.scores_BxN, rtol=1e-5, atol=1e-5)
  tok, lp = run_greedy(stacked, src)
  np.testing.assert_array_equal(tok, base_g[0])
  np.testing.assert_allclose(lp, base_g[1], rtol=1e-5, atol=1e-5)
  tgt = base.tokens_BxNxT[:, 0]
  np.testing.assert_allclose(decode.score(stacked, src, tgt, cfg=CFG),
                             teacher_forced(params, src, tgt).sum(1), rtol=1e-5, atol=1e-5)


def test_ensemble_combination_rule(params, shared):
  """Step and teacher-forced scores are log((p_1 + p_2) / 2); search scores agree with scoring."""
  other = make_params(1)
  stacked = ensemble.stack([params, other])
  src = shared["src"]
  y_prev = jnp.array([BOS_ID, 5, 6, 7, 8, 9, 10, 11])
  logp = first_step(stacked, src, y_prev)
  members = [np.float64(first_step(p, src, y_prev)) for p in (params, other)]  # model.decoder_step
  expected = np.log((np.exp(members[0]) + np.exp(members[1])) / 2)
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-6)

  hyp = run_beam(stacked, src)
  for k in range(N):
    tgt = hyp.tokens_BxNxT[:, k]
    lp1, lp2 = (np.float64(teacher_forced(p, src, tgt)) for p in (params, other))
    by_hand = np.where(tgt != PAD_ID, np.log((np.exp(lp1) + np.exp(lp2)) / 2), 0.0).sum(1)
    np.testing.assert_allclose(decode.score(stacked, src, tgt, cfg=CFG), by_hand, rtol=1e-5)
    np.testing.assert_allclose(hyp.log_probs_BxN[:, k], by_hand, rtol=1e-5)
  assert not np.allclose(hyp.scores_BxN[:, 0], shared["beam"].scores_BxN[:, 0])  # not member 0


def test_stack_rejects_different_shapes(params):
  other = init_params(1, TGT_V + 1)
  with pytest.raises(ValueError, match="member 1"):
    ensemble.stack([params, other])
