"""The paper's encoder-decoder: two deep LSTMs, separate embeddings, a full softmax.

Params pytree:
  src_embed  VsxE       source embeddings
  tgt_embed  VtxE       target embeddings
  encoder    [layer]*L  lstm.init_stack(E -> H)
  decoder    [layer]*L  separate parameters
  softmax    {w: HxVt, b: Vt}

A batch is {"src": BxS, "tgt": BxT} of int32 ids, 0-padded on the right. `src` is already
in the order the encoder reads it (reversed when data.reverse_source). `tgt` is y_1..y_n </s>;
the decoder reads <s> y_1..y_n, i.e. `tgt` shifted right behind the begin symbol.
The decoder starts from the encoder's final (h, c) of every layer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from s2s_jax import lstm
from s2s_jax.config import ModelConfig
from s2s_jax.data.vocab import BOS_ID, PAD_ID

Array = jax.Array
Params = dict[str, Any]


# model.compute_dtype's concrete values and the matmul operand dtype each names (None: float32).
OPERAND_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype | None:
  """Matmul operand dtype; None keeps float32 operands."""
  if cfg.compute_dtype in OPERAND_DTYPES:
    return OPERAND_DTYPES[cfg.compute_dtype]
  if cfg.compute_dtype == "auto":
    raise ValueError("model.compute_dtype=auto is chosen when training starts "
                     "(train.resolve_compute_dtype); the model needs float32 or bfloat16")
  raise ValueError(f"model.compute_dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")


def init_params(key: Array, cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Params:
  """All parameters U(-init_scale, init_scale), float32."""
  k_se, k_te, k_enc, k_dec, k_w, k_b = jax.random.split(key, 6)
  s, e, h = cfg.init_scale, cfg.embed_size, cfg.hidden_size
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -s, s)
  return {
      "src_embed": u(k_se, (src_vocab, e)),
      "tgt_embed": u(k_te, (tgt_vocab, e)),
      "encoder": lstm.init_stack(k_enc, cfg.num_layers, e, h, s),
      "decoder": lstm.init_stack(k_dec, cfg.num_layers, e, h, s),
      "softmax": {"w": u(k_w, (h, tgt_vocab)), "b": u(k_b, (tgt_vocab,))},
  }


def num_params(params: Params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def embed(table_VxE: Array, ids: Array) -> Array:
  """Rows of an embedding table for integer ids of any shape (-> ids.shape + (E,)).

  Ids come from the vocabulary the table was sized by, so they are in range. mode="clip"
  says so to XLA: jnp.take's default ("fill") marks out-of-range rows NaN with a select that
  XLA recomputes, with its index arithmetic, inside each consumer; the backward's transposes
  of the embedded inputs ran 2-4x slower for it (BENCHMARKS.md, ninth round).
  """
  return jnp.take(table_VxE, ids, axis=0, mode="clip")


def encode(params: Params, src_BxS: Array, cfg: ModelConfig) -> lstm.State:
  """The encoder's final (h, c) of every layer, each LxBxH."""
  b = src_BxS.shape[0]
  x_SxBxE = embed(params["src_embed"], src_BxS.T)
  mask_SxB = (src_BxS.T != PAD_ID).astype(jnp.float32)
  state0 = lstm.zero_state(cfg.num_layers, b, cfg.hidden_size, params["src_embed"].dtype)
  _, state = lstm.stack(params["encoder"], x_SxBxE, mask_SxB, state0, compute_dtype(cfg),
                        cfg.custom_vjp)
  return state


def decoder_inputs(tgt_BxT: Array) -> Array:
  """<s> y_1 .. y_{T-1}: the targets shifted right behind the begin symbol."""
  bos = jnp.full((tgt_BxT.shape[0], 1), BOS_ID, tgt_BxT.dtype)
  return jnp.concatenate([bos, tgt_BxT[:, :-1]], axis=1)


def project(params: Params, h: Array, cfg: ModelConfig) -> Array:
  """Logits over the target vocabulary for hidden states h (...xH -> ...xV)."""
  return lstm.affine(h, params["softmax"]["w"], params["softmax"]["b"], compute_dtype(cfg))


def decode_hidden(params: Params, state: lstm.State, tgt_BxT: Array, cfg: ModelConfig) -> Array:
  """Teacher-forced decoder: top-layer h at every target position, TxBxH."""
  y_in_BxT = decoder_inputs(tgt_BxT)
  x_TxBxE = embed(params["tgt_embed"], y_in_BxT.T)
  mask_TxB = (tgt_BxT.T != PAD_ID).astype(jnp.float32)
  h_TxBxH, _ = lstm.stack(params["decoder"], x_TxBxE, mask_TxB, state, compute_dtype(cfg),
                          cfg.custom_vjp)
  return h_TxBxH


def target_log_probs(params: Params, h_TxBxH: Array, tgt_TxB: Array, cfg: ModelConfig) -> Array:
  """log p(tgt | h) under the full softmax, TxB (padding positions not masked)."""
  if cfg.custom_vjp:
    return _softmax_pick(params["softmax"], h_TxBxH, tgt_TxB, cfg)
  logp_TxBxV = jax.nn.log_softmax(project(params, h_TxBxH, cfg), axis=-1)
  return jnp.take_along_axis(logp_TxBxV, tgt_TxB[..., None], axis=-1)[..., 0]


# The softmax loss with a hand-written backward pass (model.custom_vjp): the forward keeps only
# the logits (never a TxBxV log-softmax), the backward forms d logits = g * (onehot - softmax)
# in one fused pass, directly in the compute dtype, and multiplies it in the layouts XLA's CPU
# matmul library runs fastest (`lstm.transposed`, `lstm.matmul_nt`) so that a bfloat16
# model's backward products stay bfloat16 too.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_pick(softmax: Params, h_TxBxH: Array, tgt_TxB: Array, cfg: ModelConfig) -> Array:
  return _softmax_pick_fwd(softmax, h_TxBxH, tgt_TxB, cfg)[0]


def _softmax_pick_fwd(softmax, h_TxBxH, tgt_TxB, cfg):
  logits_TxBxV = project({"softmax": softmax}, h_TxBxH, cfg)
  max_TxBx1 = jnp.max(logits_TxBxV, axis=-1, keepdims=True)  # as jax.nn.log_softmax computes it
  lse_TxBx1 = jnp.log(jnp.sum(jnp.exp(logits_TxBxV - max_TxBx1), axis=-1, keepdims=True))
  picked_TxBx1 = jnp.take_along_axis(logits_TxBxV, tgt_TxB[..., None], axis=-1) - max_TxBx1
  lp_TxB = (picked_TxBx1 - lse_TxBx1)[..., 0]
  return lp_TxB, (softmax, h_TxBxH, tgt_TxB, logits_TxBxV, max_TxBx1 + lse_TxBx1)


def _softmax_pick_bwd(cfg, res, g_TxB):
  softmax, h_TxBxH, tgt_TxB, logits_TxBxV, norm_TxBx1 = res
  cd = compute_dtype(cfg) or h_TxBxH.dtype
  v = logits_TxBxV.shape[-1]
  onehot_TxBxV = jnp.arange(v) == tgt_TxB[..., None]
  dlogits_TxBxV = g_TxB[..., None] * (onehot_TxBxV - jnp.exp(logits_TxBxV - norm_TxBx1))
  dlogits_NxV = dlogits_TxBxV.astype(cd).reshape(-1, v)  # N = T*B rows
  w = softmax["w"]
  dtype = compute_dtype(cfg)
  dw, db = lstm.weight_and_bias_grads(h_TxBxH, dlogits_NxV, dtype)
  grads = {"w": dw.astype(w.dtype), "b": db.astype(softmax["b"].dtype)}
  dh_NxH = lstm.matmul_nt(dlogits_NxV, w.astype(cd), dtype)
  return grads, dh_NxH.reshape(h_TxBxH.shape).astype(h_TxBxH.dtype), None


_softmax_pick.defvjp(_softmax_pick_fwd, _softmax_pick_bwd)


def token_log_probs(params: Params, batch: dict[str, Array], cfg: ModelConfig,
                    pick: Callable = target_log_probs) -> Array:
  """log p(y_t | x, y_<t) of every target token, BxT, 0 at padding.

  `pick(params, h_TxBxH, tgt_TxB, cfg) -> TxB` turns decoder states into target log
  probabilities; the default is the full softmax, `parallel` passes a vocabulary-sharded one.
  """
  state = encode(params, batch["src"], cfg)
  h_TxBxH = decode_hidden(params, state, batch["tgt"], cfg)
  tgt_TxB = batch["tgt"].T
  lp_TxB = pick(params, h_TxBxH, tgt_TxB, cfg)
  return jnp.where(tgt_TxB != PAD_ID, lp_TxB, 0.0).T


def loss_fn(params: Params, batch: dict[str, Array], cfg: ModelConfig,
            pick: Callable = target_log_probs) -> tuple[Array, dict]:
  """The paper's loss: summed token NLL over the batch divided by the number of sentences.

  Sentences are the rows with at least one target token, so all-padding rows (used to fill
  a batch) neither add to the sum nor to the divisor. `pick`: see `token_log_probs`.
  """
  lp_BxT = token_log_probs(params, batch, cfg, pick)
  nll_sum = -jnp.sum(lp_BxT)
  num_tokens = jnp.sum(batch["tgt"] != PAD_ID)
  num_sents = jnp.sum(jnp.any(batch["tgt"] != PAD_ID, axis=1))
  loss = nll_sum / jnp.maximum(num_sents, 1)
  return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens, "num_sents": num_sents}


def decoder_step(params: Params, state: lstm.State, y_prev_B: Array,
                 cfg: ModelConfig) -> tuple[Array, lstm.State]:
  """One decoding step: log p(. | state, y_prev) as BxV, and the new state."""
  x_BxE = embed(params["tgt_embed"], y_prev_B)
  h_BxH, state = lstm.stack_step(params["decoder"], x_BxE, state, compute_dtype(cfg))
  return log_softmax(project(params, h_BxH, cfg)), state


def log_softmax(logits: Array) -> Array:
  """log softmax over the last axis, written x - (max + log sum exp(x - max)): in a decoding
  step XLA's CPU backend runs this form about 1.5x faster than jax.nn.log_softmax (which it
  fuses into the matmul library call together with the max). Not for gradients."""
  max_ = jnp.max(logits, axis=-1, keepdims=True)
  return logits - (max_ + jnp.log(jnp.sum(jnp.exp(logits - max_), axis=-1, keepdims=True)))
