"""Search and scoring: greedy and beam search as one jitted program each, teacher-forced scores.

Shapes: B sentences, W beam width (live hypotheses per sentence), N n-best size, V target
vocabulary, T output positions, R = B*W decoder rows (row b*W + w is hypothesis w of sentence b).

The search functions are generic over a step function `step_fn(state, y_prev_R) ->
(logp_RxV, state)` whose state leaves hold the rows on axis -2 (`ensemble.STATE_ROW_AXIS`);
`greedy`, `beam` and `score` bind it to a model or an ensemble (see `s2s_jax.ensemble`).
Leaves inside a `model.Memory` (what attention reads of the source) are the same for every
hypothesis of a sentence: the beam copies them once per hypothesis and never reorders them.
Everything runs in one `lax.while_loop` on device with static shapes; the host only sees the
final arrays. Asked for (`alignment`), the searches also return the attention weights of the
hypotheses they return, one row over the source positions per output token.

Beam search semantics (the paper's, by default):
- Live hypotheses are extended by every word; of the W*V extensions of a sentence, the W best
  are "kept". A kept extension ending in </s> leaves the beam and joins the complete set; the
  beam is refilled to W live hypotheses with the best extensions that do not end in </s> (the
  top-2W extensions always hold W of them). With W = 1 this is exactly greedy search.
- Scores are sums of log-probabilities; no length normalisation unless `length_penalty` (GNMT
  alpha) > 0, in which case complete hypotheses are ranked by log p / ((5 + |y|) / 6)^alpha,
  |y| counting </s>. (Live hypotheses all have the same length, so their order is unchanged.)
- A sentence stops as soon as no live hypothesis can beat the N-th best complete one (for
  N = 1: the best one). This is exact, not a heuristic: log-probabilities only fall as a
  hypothesis grows, so no later complete hypothesis could enter the n-best list. With a length
  penalty the bound is live log p / lp(cap), still exact.
- Maximum length: sentence b emits at most cap_b = min(max_len, floor(a * |x_b|) + b) tokens,
  </s> included; at its last position only </s> is allowed (log p(</s>) is still scored). The
  caps are computed exactly on the host (`output_caps`) and passed to the search as an array.
- <pad> and <s> are never emitted (they are not output words); <unk> may be.
- Ties: the lower (beam-major) index wins everywhere, as in `argmax`; a complete hypothesis
  found earlier wins over an equal later one. Each sentence's search uses only its own rows, and
  once it has stopped its n-best list cannot change (see the stop rule) while the rest of the
  batch runs on, so its results do not depend on the batch it is decoded in.
"""

from __future__ import annotations

import fractions
import functools
import math
import sys
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import cpu_kernels, ensemble, model
from s2s_jax.config import DecodeConfig
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]  # (state, y_prev_R) -> (logp_RxV, state)
NEG_INF = -jnp.inf


class Hypotheses(NamedTuple):
  """The n-best lists of a batch, best first. An unused slot has score -inf and all-<pad> tokens."""
  tokens_BxNxT: Array  # ids ending in </s>, then <pad>
  scores_BxN: Array  # the ranking score: log p, or log p / lp(|y|) with a length penalty
  log_probs_BxN: Array  # log p(y | x) (equal to scores_BxN when length_penalty == 0)
  steps: Array  # decoder steps the batch ran (the longest search in it), a scalar
  attention_BxNxTxS: Array | None = None  # the weights of every output token (if asked)


def max_output_length(src_len: int, a: float, b: int) -> int:
  """The cap on the output length (</s> included) for `src_len` source tokens: floor(a *
  src_len) + b, at least 1, exactly, with `a` the decimal number it is written as (1.3 is
  13/10, not the nearest binary fraction: floor(1.3 * 90) + 0 is 117)."""
  a_exact = fractions.Fraction(repr(float(a)))
  return max(1, a_exact.numerator * int(src_len) // a_exact.denominator + int(b))


def output_caps(src_lengths: Sequence[int], a: float, b: int, max_len: int) -> np.ndarray:
  """int32 caps of a batch: min(max_len, `max_output_length`) a sentence, 1 (only </s>) for an
  empty row."""
  return np.asarray([min(max_len, max_output_length(n, a, b)) if n else 1
                     for n in src_lengths], np.int32)


def _caps(src_BxS: Array, cap_B: Array | None, max_len: int) -> Array:
  """`cap_B`, or max_len for every sentence (1 for an all-padding row) when it is None."""
  if cap_B is not None:
    return jnp.asarray(cap_B, jnp.int32)
  return jnp.where(jnp.any(src_BxS != PAD_ID, axis=1), max_len, 1)


def length_penalty_factor(length: Array, alpha: float) -> Array:
  """GNMT's lp(|y|) = ((5 + |y|) / 6)^alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _mask_non_words(logp_RxV: Array) -> Array:
  """-inf for <pad> and <s>, which are never emitted."""
  v = jnp.arange(logp_RxV.shape[-1])
  return jnp.where((v == PAD_ID) | (v == BOS_ID), NEG_INF, logp_RxV)


def _take_rows(state: Any, rows_R: Array) -> Any:
  take = lambda x: x if isinstance(x, model.Memory) else jnp.take(
      x, rows_R, axis=ensemble.STATE_ROW_AXIS)
  return jax.tree_util.tree_map(take, state, is_leaf=lambda x: isinstance(x, model.Memory))


AlignFn = Callable[[Any], Array]  # decoder state -> the last step's attention weights, RxS


def greedy_search(step_fn: StepFn, state: Any, cap_B: Array, max_len: int,
                  argmax: Callable[[Array], Array] = lambda x: jnp.argmax(x, axis=-1),
                  alignment: AlignFn | None = None) -> tuple[Array, ...]:
  """Arg-max decoding of B sentences. Returns (tokens BxT, log p B); T = max_len.
  `argmax`: jnp.argmax over the last axis, or a function computing the same. With
  `alignment`, also the weights of every output token, BxTxS."""
  b = cap_B.shape[0]
  init = (jnp.int32(0), state, jnp.full((b,), BOS_ID, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), jnp.float32), jnp.full((b, max_len), PAD_ID, jnp.int32))
  if alignment is not None:
    init += (jnp.zeros((b, max_len) + alignment(state).shape[1:], jnp.float32),)

  def cond(carry):
    t, _, _, done_B, _, _ = carry[:6]
    return (t < max_len) & ~jnp.all(done_B)

  def body(carry):
    t, state, y_prev_B, done_B, logp_B, tokens_BxT = carry[:6]
    logp_BxV, state = step_fn(state, y_prev_B)
    logp_BxV = _mask_non_words(logp_BxV)
    y_B = argmax(logp_BxV).astype(jnp.int32)
    y_B = jnp.where(t + 1 >= cap_B, EOS_ID, y_B)  # the cap forces </s>
    lp_B = jnp.take_along_axis(logp_BxV, y_B[:, None], axis=-1)[:, 0]
    logp_B = logp_B + jnp.where(done_B, 0.0, lp_B)
    y_B = jnp.where(done_B, PAD_ID, y_B)
    tokens_BxT = tokens_BxT.at[:, t].set(y_B)
    out = (t + 1, state, y_B, done_B | (y_B == EOS_ID), logp_B, tokens_BxT)
    if alignment is not None:
      out += (carry[6].at[:, t].set(alignment(state)),)
    return out

  out = jax.lax.while_loop(cond, body, init)
  return (out[5], out[4]) + out[6:]


def beam_search(step_fn: StepFn, state: Any, cap_B: Array, *, beam_size: int, nbest: int,
                max_len: int, length_penalty: float = 0.0, early_stop: bool = True,
                alignment: AlignFn | None = None) -> Hypotheses:
  """Beam search of B sentences (semantics in the module docstring).

  `state` has B rows (one per sentence); it is replicated to B*W rows here. With
  `early_stop=False` every sentence runs to its cap (for tests of the stop rule). With
  `alignment`, each hypothesis carries the weights of its tokens along (BxWxTxS), and the
  n-best ones come back in `attention_BxNxTxS`.
  """
  if not 1 <= nbest <= beam_size:
    raise ValueError(f"nbest must be between 1 and the beam size {beam_size}, got {nbest}")
  b, w, n, t_max = cap_B.shape[0], beam_size, nbest, max_len
  state = jax.tree_util.tree_map(
      lambda x: jnp.repeat(x, w, axis=ensemble.STATE_ROW_AXIS), state)
  first_row = jnp.arange(w) == 0
  init = dict(
      t=jnp.int32(0), state=state, y_prev_R=jnp.full((b * w,), BOS_ID, jnp.int32),
      live_lp_BxW=jnp.broadcast_to(jnp.where(first_row, 0.0, NEG_INF), (b, w)),
      live_tok_BxWxT=jnp.full((b, w, t_max), PAD_ID, jnp.int32),
      fin_tok_BxNxT=jnp.full((b, n, t_max), PAD_ID, jnp.int32),
      fin_score_BxN=jnp.full((b, n), NEG_INF, jnp.float32),
      fin_lp_BxN=jnp.full((b, n), NEG_INF, jnp.float32),
      done_B=jnp.zeros((b,), bool))
  if alignment is not None:
    src = alignment(state).shape[1:]
    init.update(live_att_BxWxTxS=jnp.zeros((b, w, t_max) + src, jnp.float32),
                fin_att_BxNxTxS=jnp.zeros((b, n, t_max) + src, jnp.float32))
  normalize = ((lambda lp, length: lp / length_penalty_factor(length, length_penalty))
               if length_penalty else (lambda lp, length: lp))

  def cond(c):
    return (c["t"] < t_max) & ~jnp.all(c["done_B"])

  def body(c):
    t = c["t"]
    logp_RxV, state = step_fn(c["state"], c["y_prev_R"])
    v = logp_RxV.shape[-1]
    logp_BxWxV = _mask_non_words(logp_RxV).reshape(b, w, v)
    cand_BxWxV = c["live_lp_BxW"][:, :, None] + logp_BxWxV
    at_cap_B = t + 1 >= cap_B
    cand_BxWxV = jnp.where(at_cap_B[:, None, None] & (jnp.arange(v) != EOS_ID), NEG_INF, cand_BxWxV)
    top_lp_Bx2W, top_idx_Bx2W = jax.lax.top_k(cand_BxWxV.reshape(b, w * v), 2 * w)
    parent_Bx2W, tok_Bx2W = top_idx_Bx2W // v, (top_idx_Bx2W % v).astype(jnp.int32)
    seq_Bx2WxT = jnp.take_along_axis(c["live_tok_BxWxT"], parent_Bx2W[:, :, None], axis=1)
    seq_Bx2WxT = seq_Bx2WxT.at[:, :, t].set(tok_Bx2W)
    is_eos_Bx2W = tok_Bx2W == EOS_ID

    # Kept extensions ending in </s> join the complete set (earlier entries win ties).
    joins_Bx2W = is_eos_Bx2W & (jnp.arange(2 * w) < w)
    new_lp_Bx2W = jnp.where(joins_Bx2W, top_lp_Bx2W, NEG_INF)
    all_score = jnp.concatenate([c["fin_score_BxN"], normalize(new_lp_Bx2W, t + 1)], axis=1)
    fin_score_BxN, pick_BxN = jax.lax.top_k(all_score, n)
    all_lp = jnp.concatenate([c["fin_lp_BxN"], new_lp_Bx2W], axis=1)
    fin_lp_BxN = jnp.take_along_axis(all_lp, pick_BxN, axis=1)
    all_tok = jnp.concatenate([c["fin_tok_BxNxT"], seq_Bx2WxT], axis=1)
    fin_tok_BxNxT = jnp.take_along_axis(all_tok, pick_BxN[:, :, None], axis=1)
    # (A stopped sentence runs on while others in its batch do, but by the stop rule nothing it
    # completes can enter its n-best list any more, and ties go to the earlier entries.)

    # The beam: the W best extensions not ending in </s>, in rank order.
    live_lp_BxW, sel_BxW = jax.lax.top_k(jnp.where(is_eos_Bx2W, NEG_INF, top_lp_Bx2W), w)
    live_tok_BxWxT = jnp.take_along_axis(seq_Bx2WxT, sel_BxW[:, :, None], axis=1)
    y_BxW = jnp.take_along_axis(tok_Bx2W, sel_BxW, axis=1)
    parent_BxW = jnp.take_along_axis(parent_Bx2W, sel_BxW, axis=1)
    rows_R = (jnp.arange(b)[:, None] * w + parent_BxW).reshape(-1)
    out = {}
    if alignment is not None:  # the same bookkeeping as the tokens': parent's, then this step's
      a_RxS = alignment(state)
      a_BxWxS = a_RxS.reshape((b, w) + a_RxS.shape[1:])
      att_Bx2WxTxS = jnp.take_along_axis(c["live_att_BxWxTxS"], parent_Bx2W[:, :, None, None],
                                         axis=1)
      att_Bx2WxTxS = att_Bx2WxTxS.at[:, :, t].set(
          jnp.take_along_axis(a_BxWxS, parent_Bx2W[:, :, None], axis=1))
      all_att = jnp.concatenate([c["fin_att_BxNxTxS"], att_Bx2WxTxS], axis=1)
      out["fin_att_BxNxTxS"] = jnp.take_along_axis(all_att, pick_BxN[:, :, None, None], axis=1)
      out["live_att_BxWxTxS"] = jnp.take_along_axis(att_Bx2WxTxS, sel_BxW[:, :, None, None],
                                                    axis=1)
    state = _take_rows(state, rows_R)

    best_live_B = live_lp_BxW[:, 0]
    if length_penalty:
      best_live_B = best_live_B / length_penalty_factor(cap_B, length_penalty)
    stop_B = best_live_B == NEG_INF
    if early_stop:
      stop_B |= best_live_B <= fin_score_BxN[:, n - 1]
    return dict(t=t + 1, state=state, y_prev_R=y_BxW.reshape(-1), live_lp_BxW=live_lp_BxW,
                live_tok_BxWxT=live_tok_BxWxT, fin_tok_BxNxT=fin_tok_BxNxT,
                fin_score_BxN=fin_score_BxN, fin_lp_BxN=fin_lp_BxN, done_B=c["done_B"] | stop_B,
                **out)

  out = jax.lax.while_loop(cond, body, init)
  return Hypotheses(out["fin_tok_BxNxT"], out["fin_score_BxN"], out["fin_lp_BxN"], out["t"],
                    out.get("fin_att_BxNxTxS"))


def _model_step(params: model.Params, cfg: ensemble.ModelCfg) -> StepFn:
  return lambda state, y_prev: ensemble.decoder_step(params, state, y_prev, cfg)


def _alignment(cfg: ensemble.ModelCfg, wanted: bool) -> AlignFn | None:
  return (lambda state: ensemble.alignment(state, cfg)) if wanted else None


def _kernels_on(cfg: ensemble.ModelCfg) -> bool:
  return all(model.cpu_kernels_on(c) for c in (cfg if isinstance(cfg, tuple) else (cfg,)))


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "alignment"))
def greedy(params: model.Params, src_BxS: Array, cap_B: Array | None = None, *,
           cfg: ensemble.ModelCfg, max_len: int, alignment: bool = False) -> tuple[Array, ...]:
  """Arg-max decoding with a model or an ensemble. Returns (tokens BxT, log p B) and, with
  `alignment`, the attention weights BxTxS. `cap_B`: each sentence's `output_caps` (None:
  max_len)."""
  state = ensemble.encode(params, src_BxS, cfg)
  argmax = cpu_kernels.argmax if _kernels_on(cfg) else (lambda x: jnp.argmax(x, axis=-1))
  return greedy_search(_model_step(params, cfg), state, _caps(src_BxS, cap_B, max_len), max_len,
                       argmax, _alignment(cfg, alignment))


@functools.partial(jax.jit, static_argnames=("cfg", "beam_size", "nbest", "max_len",
                                             "length_penalty", "alignment"))
def beam(params: model.Params, src_BxS: Array, cap_B: Array | None = None, *,
         cfg: ensemble.ModelCfg, beam_size: int, nbest: int = 1, max_len: int,
         length_penalty: float = 0.0, alignment: bool = False) -> Hypotheses:
  """Beam search with a model or an ensemble; the encoder runs once per batch. `cap_B`: each
  sentence's `output_caps` (None: max_len). `alignment`: also return the attention weights of
  the hypotheses (Hypotheses.attention_BxNxTxS)."""
  state = ensemble.encode(params, src_BxS, cfg)
  return beam_search(_model_step(params, cfg), state, _caps(src_BxS, cap_B, max_len),
                     beam_size=beam_size, nbest=nbest, max_len=max_len,
                     length_penalty=length_penalty, alignment=_alignment(cfg, alignment))


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(params: model.Params, src_BxS: Array, tgt_BxT: Array, *,
          cfg: ensemble.ModelCfg) -> Array:
  """log p(y | x) of each (source, target) row under a model or an ensemble, B."""
  return jnp.sum(ensemble.token_log_probs(params, {"src": src_BxS, "tgt": tgt_BxT}, cfg), axis=1)


# ---------------------------------------------------------------------------------------------
# Host side: many sentences of any length -> sorted, padded batches -> results in input order.

class Translation(NamedTuple):
  tokens: list[int]  # target ids without </s>
  score: float  # ranking score (see Hypotheses)
  log_prob: float  # log p(y | x), </s> included
  attention: np.ndarray | None = None  # weights per token over the source ids, len(tokens) x |x|


MIN_PADDED_LEN = 16  # source and target lengths are padded to powers of two, at least this


def _pow2(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _batch_rows(n: int, batch_size: int) -> int:
  """Rows of a batch holding n sentences: a power of two up to batch_size (few compiled shapes)."""
  return min(batch_size, _pow2(n))


def _padded_length(n: int) -> int:
  """Padded length for n positions: a power of two >= MIN_PADDED_LEN. Each shape is a new
  compiled program, which costs more than the extra padding (the encoder runs once)."""
  return max(MIN_PADDED_LEN, _pow2(n))


def _length_sorted_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(total: int, enabled: bool, unit: str):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def translate_ids(params: model.Params, cfg: ensemble.ModelCfg, sources: Sequence[Sequence[int]],
                  dcfg: DecodeConfig, *, progress: bool = False,
                  alignment: bool = False) -> list[list[Translation]]:
  """N-best translations (dcfg.nbest, best first) of every source id list, in input order.

  Sentences are sorted by length and decoded dcfg.batch_size at a time, the source padded to
  `_padded_length`, so few programs get compiled; beam_size 1 runs `greedy`. An empty source
  gets an empty translation without decoding. `alignment`: fill Translation.attention (the
  model needs attention).
  """
  results: list[list[Translation]] = [[Translation([], 0.0, 0.0)] for _ in sources]
  todo = [i for i, s in enumerate(sources) if len(s)]
  chunks = _length_sorted_chunks([len(sources[i]) for i in todo], dcfg.batch_size)
  bar = _progress(len(todo), progress and len(chunks) > 1, "sent")

  def collect(idx: list[int], out: Any) -> None:
    att_BxNxTxS = None
    if dcfg.beam_size == 1:
      tok_BxT, lp_B, *att = jax.device_get(out)
      tok_BxNxT, score_BxN, lp_BxN = tok_BxT[:, None], lp_B[:, None], lp_B[:, None]
      att_BxNxTxS = att[0][:, None] if att else None
    else:
      tok_BxNxT, score_BxN, lp_BxN, _, att_BxNxTxS = jax.device_get(out)

    def weights(r: int, k: int, n: int):
      return None if att_BxNxTxS is None else att_BxNxTxS[r, k, :n, :len(sources[idx[r]])]

    for r, i in enumerate(idx):  # unused n-best slots (score -inf) are dropped
      results[i] = []
      for k in range(tok_BxNxT.shape[1]):
        if np.isfinite(score_BxN[r, k]):
          tokens = _strip(tok_BxNxT[r, k])
          results[i].append(Translation(tokens, float(score_BxN[r, k]), float(lp_BxN[r, k]),
                                        weights(r, k, len(tokens))))
    if bar is not None:
      bar.update(len(idx))

  pending = None  # the batch in flight: the next one is dispatched before it is read
  for chunk in chunks:
    idx = [todo[j] for j in chunk]
    s_len = _padded_length(max(len(sources[i]) for i in idx))
    src = np.zeros((_batch_rows(len(idx), dcfg.batch_size), s_len), np.int32)
    for r, i in enumerate(idx):
      src[r, :len(sources[i])] = sources[i]
    max_len = max_output_length(s_len, dcfg.max_len_a, dcfg.max_len_b)
    caps = output_caps([len(sources[i]) for i in idx] + [0] * (len(src) - len(idx)),
                       dcfg.max_len_a, dcfg.max_len_b, max_len)
    kw = {"alignment": True} if alignment else {}
    if dcfg.beam_size == 1:
      out = greedy(params, src, caps, cfg=cfg, max_len=max_len, **kw)
    else:
      out = beam(params, src, caps, cfg=cfg, beam_size=dcfg.beam_size, nbest=dcfg.nbest,
                 max_len=max_len, length_penalty=dcfg.length_penalty, **kw)
    if pending is not None:
      collect(*pending)
    pending = (idx, out)
  if pending is not None:
    collect(*pending)
  if bar is not None:
    bar.close()
  return results


def _strip(ids_T: np.ndarray) -> list[int]:
  """Ids before the first </s> (and without padding)."""
  out = []
  for i in ids_T.tolist():
    if i == EOS_ID:
      break
    if i != PAD_ID:
      out.append(i)
  return out


def score_ids(params: model.Params, cfg: ensemble.ModelCfg,
              pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 64, *,
              progress: bool = False) -> list[float]:
  """log p(y | x) of every (source ids, target ids) pair; </s> is appended to each target here."""
  lengths = [max(len(s), len(t) + 1) for s, t in pairs]
  chunks = _length_sorted_chunks(lengths, batch_size)
  pending = []
  for chunk in chunks:
    s_len = _padded_length(max(len(pairs[i][0]) for i in chunk))
    t_len = _padded_length(max(len(pairs[i][1]) + 1 for i in chunk))
    rows = _batch_rows(len(chunk), batch_size)
    src, tgt = np.zeros((rows, s_len), np.int32), np.zeros((rows, t_len), np.int32)
    for r, i in enumerate(chunk):
      s, t = pairs[i]
      src[r, :len(s)] = s
      tgt[r, :len(t) + 1] = list(t) + [EOS_ID]
    pending.append((chunk, score(params, src, tgt, cfg=cfg)))
  out = [0.0] * len(pairs)
  bar = _progress(len(pairs), progress and len(chunks) > 1, "pair")
  for chunk, lp_B in pending:
    lp_B = jax.device_get(lp_B)
    for r, i in enumerate(chunk):
      out[i] = float(lp_B[r])
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  return out


def perplexity(eval_fn: Callable, params: model.Params,
               batches: Iterable[dict[str, np.ndarray]]) -> tuple[float, float]:
  """(mean NLL per target token including </s>, its exp) over all batches; `eval_fn(params,
  batch)` gives a batch's {"nll_sum", "num_tokens"} (ensemble.eval_step, train.eval_step)."""
  nll, tokens = 0.0, 0
  outs = [eval_fn(params, b) for b in batches]
  for o in jax.device_get(outs):
    nll += float(o["nll_sum"])
    tokens += int(o["num_tokens"])
  mean = nll / max(tokens, 1)
  return mean, math.exp(min(mean, 700.0))
