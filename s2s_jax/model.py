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

model.kernels picks how the LSTM layers and the softmax loss run: plain JAX (`lstm`, autodiff)
or `cpu_kernels` (hand-written backward passes, faster on XLA's CPU backend); auto takes the
latter only when JAX's default backend is the CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from s2s_jax import cpu_kernels, lstm
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


def cpu_kernels_on(cfg: ModelConfig) -> bool:
  """Whether `cfg` runs the `cpu_kernels` (model.kernels=cpu, or auto on a CPU backend)."""
  return cfg.kernels == "cpu" or (cfg.kernels == "auto" and jax.default_backend() == "cpu")


def layer_fn(cfg: ModelConfig) -> Callable:
  """The function that runs one LSTM layer under `cfg`: lstm.layer or cpu_kernels.fused_layer."""
  return cpu_kernels.fused_layer if cpu_kernels_on(cfg) else lstm.layer


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

  Ids come from the vocabulary the table was sized by, so they are in range: training batches
  map the prepared store's ids through lookup tables into the vocabulary, and an id beyond
  the store's token table is a DataError when the batch is made (data/prepared.py); decoding
  encodes text with the vocabulary itself. mode="clip" tells XLA so (the default "fill" adds
  an out-of-range select to every consumer); it never changes an id that reaches it.
  """
  return jnp.take(table_VxE, ids, axis=0, mode="clip")


def encode(params: Params, src_BxS: Array, cfg: ModelConfig) -> lstm.State:
  """The encoder's final (h, c) of every layer, each LxBxH."""
  b = src_BxS.shape[0]
  x_SxBxE = embed(params["src_embed"], src_BxS.T)
  mask_SxB = (src_BxS.T != PAD_ID).astype(jnp.float32)
  state0 = lstm.zero_state(cfg.num_layers, b, cfg.hidden_size, params["src_embed"].dtype)
  _, state = lstm.stack(params["encoder"], x_SxBxE, mask_SxB, state0, compute_dtype(cfg),
                        layer_fn(cfg))
  return state


def decoder_inputs(tgt_BxT: Array) -> Array:
  """<s> y_1 .. y_{T-1}: the targets shifted right behind the begin symbol."""
  bos = jnp.full((tgt_BxT.shape[0], 1), BOS_ID, tgt_BxT.dtype)
  return jnp.concatenate([bos, tgt_BxT[:, :-1]], axis=1)


def project(params: Params, h: Array, cfg: ModelConfig) -> Array:
  """Logits over the target vocabulary for hidden states h (...xH -> ...xV)."""
  return lstm.matmul(h, params["softmax"]["w"], compute_dtype(cfg)) + params["softmax"]["b"]


def decode_hidden(params: Params, state: lstm.State, tgt_BxT: Array, cfg: ModelConfig) -> Array:
  """Teacher-forced decoder: top-layer h at every target position, TxBxH."""
  y_in_BxT = decoder_inputs(tgt_BxT)
  x_TxBxE = embed(params["tgt_embed"], y_in_BxT.T)
  mask_TxB = (tgt_BxT.T != PAD_ID).astype(jnp.float32)
  h_TxBxH, _ = lstm.stack(params["decoder"], x_TxBxE, mask_TxB, state, compute_dtype(cfg),
                          layer_fn(cfg))
  return h_TxBxH


def target_log_probs(params: Params, h_TxBxH: Array, tgt_TxB: Array, cfg: ModelConfig) -> Array:
  """log p(tgt | h) under the full softmax, TxB (padding positions not masked)."""
  if cpu_kernels_on(cfg):
    return cpu_kernels.softmax_pick(params["softmax"], h_TxBxH, tgt_TxB, compute_dtype(cfg))
  logp_TxBxV = jax.nn.log_softmax(project(params, h_TxBxH, cfg), axis=-1)
  return jnp.take_along_axis(logp_TxBxV, tgt_TxB[..., None], axis=-1)[..., 0]


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
  logits_BxV = project(params, h_BxH, cfg)
  if cpu_kernels_on(cfg):
    return cpu_kernels.log_softmax(logits_BxV), state
  return jax.nn.log_softmax(logits_BxV, axis=-1), state
