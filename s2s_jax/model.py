"""The paper's encoder-decoder: two deep LSTMs, separate embeddings, a full softmax.

Params pytree:
  src_embed  VsxE       source embeddings
  tgt_embed  VtxE       target embeddings
  encoder    [layer]*L  lstm.init_stack(E -> H)
  decoder    [layer]*L  separate parameters
  softmax    {w: HxVt, b: Vt}
  attention  {w_c: 2HxH, ...}   only with model.attention (see `init_attention`)

With model.encoder=bi, encoder[0] is {fwd, bwd}: two layers of H/2 cells reading the source in
both directions (see `run_encoder`). With model.input_feeding (and attention=additive), decoder
layer 0 reads [word; attentional vector] (and the context) and its w_x has H more rows each.
Parameters of a switch exist only when it is on, so the paper's model is unchanged.

A batch is {"src": BxS, "tgt": BxT} of int32 ids, 0-padded on the right. `src` is already
in the order the encoder reads it (reversed when data.reverse_source). `tgt` is y_1..y_n </s>;
the decoder reads <s> y_1..y_n, i.e. `tgt` shifted right behind the begin symbol.
The decoder starts from the encoder's final (h, c) of every layer.

Beyond the paper (every switch off by default):
- Dropout (model.dropout, Zaremba et al. 2014) on the non-recurrent connections only: the
  embedded words entering layer 0 (encoder and decoder), each layer's h entering the next, and
  the vector entering the softmax; never on h_{t-1} -> h_t, the encoder state handed to the
  decoder, the input-fed vector or the attention's reads. Training only: `loss_fn(..., rng=)`.
  Each batch row draws its masks from its own key, fold_in(rng, global row index), so every
  parallel layout that splits a batch by rows draws the same masks.
- Attention (model.attention) over the encoder's top-layer outputs h_s, padding masked:
  a_t = softmax_s(score(q, h_s)), context c_t = sum_s a_t(s) h_s, and the attentional vector
  h~_t = tanh(W_c [c_t; h_t]) feeds the softmax (Luong et al. 2015). Scores: dot q.h_s,
  general q.(W_a h_s), concat v.tanh(W_q q + W_k h_s), location (W_a q)[s] (the position
  only), all with the query q = the decoder's top h_t; additive (Bahdanau et al. 2015) is
  v.tanh(W_q q + W_k h_s) with q = h_{t-1}, the state before the step, and c_t also enters
  layer 0 of the step (Bahdanau's deep maxout output is replaced by h~_t, as for the others).
  With model.input_feeding, h~_{t-1} enters layer 0 beside the word.
- Without input feeding the Luong scores leave the decoder's recurrence as the paper's, so
  training runs it layer-major (the fast path, model.kernels included) and attends over all
  steps at once; input feeding and additive attention make each step depend on the previous
  step's attention: a `lax.scan` over time with the layers inside, plain autodiff.
- Bidirectional encoder (model.encoder=bi): the first layer only, as GNMT: H/2 cells read the
  source forwards and H/2 backwards, their outputs concatenated (H) feed the layers above,
  which stay unidirectional. The decoder's layer 0 starts from [forward final; backward final]
  (both directions' summaries of the whole source), the layers above from theirs.
- Label smoothing (optim.label_smoothing) in `loss_fn`, through optax.

model.kernels picks how the LSTM layers and the softmax loss run: plain JAX (`lstm`, autodiff)
or `cpu_kernels` (hand-written backward passes, faster on XLA's CPU backend); auto takes the
latter only when JAX's default backend is the CPU.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

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


def init_attention(key: Array, cfg: ModelConfig) -> Params:
  """The attention's parameters: w_c (2HxH, the attentional vector) and the score's: w_a (HxH,
  general; HxP, location with P = attention_positions), or w_q, w_k (HxH) and v (H) (concat,
  additive); dot has none. All U(-init_scale, init_scale)."""
  s, h = cfg.init_scale, cfg.hidden_size
  k_c, k_a, k_k, k_v = jax.random.split(key, 4)
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -s, s)
  params = {"w_c": u(k_c, (2 * h, h))}
  if cfg.attention == "general":
    params["w_a"] = u(k_a, (h, h))
  elif cfg.attention == "location":
    params["w_a"] = u(k_a, (h, cfg.attention_positions))
  elif cfg.attention in ("concat", "additive"):
    params.update(w_q=u(k_a, (h, h)), w_k=u(k_k, (h, h)), v=u(k_v, (h,)))
  return params


def init_params(key: Array, cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Params:
  """All parameters U(-init_scale, init_scale), float32."""
  k_se, k_te, k_enc, k_dec, k_w, k_b = jax.random.split(key, 6)
  s, e, h = cfg.init_scale, cfg.embed_size, cfg.hidden_size
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -s, s)
  decoder_in = e + h * (int(cfg.input_feeding) + int(cfg.attention == "additive"))
  params = {
      "src_embed": u(k_se, (src_vocab, e)),
      "tgt_embed": u(k_te, (tgt_vocab, e)),
      "encoder": lstm.init_stack(k_enc, cfg.num_layers, e, h, s),
      "decoder": lstm.init_stack(k_dec, cfg.num_layers, decoder_in, h, s),
      "softmax": {"w": u(k_w, (h, tgt_vocab)), "b": u(k_b, (tgt_vocab,))},
  }
  if cfg.encoder == "bi":
    k_fwd, k_bwd = jax.random.split(jax.random.fold_in(k_enc, 1))
    params["encoder"][0] = {"fwd": lstm.init_layer(k_fwd, e, h // 2, s),
                            "bwd": lstm.init_layer(k_bwd, e, h // 2, s)}
  if cfg.attention != "none":
    params["attention"] = init_attention(jax.random.fold_in(key, 1), cfg)
  return params


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


# ------------------------------------------------------------------------------ dropout

DropFn = Callable[[int, Array], Array]  # (site, x ...xBxD) -> x with dropout applied
ENCODER_SITE, DECODER_SITE, OUTPUT_SITE = 0, 1000, 2000  # + layer: one mask stream per input


def row_keys(key: Array, rows: int, first_row: Array | int = 0) -> Array:
  """One PRNG key per batch row, fold_in(key, global row index), Bx2."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_row + jnp.arange(rows))


def dropout_fn(rate: float, keys_B: Array) -> DropFn:
  """Inverted dropout at `rate`: x * mask / (1 - rate). Row b's mask at site k is drawn from
  fold_in(keys_B[b], k), of the shape of x without its row axis (-2)."""
  keep = 1.0 - rate

  def drop(site: int, x: Array) -> Array:
    shape = x.shape[:-2] + x.shape[-1:]
    draw = lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), keep, shape)
    mask = jax.vmap(draw, out_axes=x.ndim - 2)(keys_B)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)

  return drop


def _at(drop: DropFn | None, base: int) -> DropFn | None:
  """`drop` with its sites counted from `base` (a stack's layer l draws at base + l)."""
  return None if drop is None else (lambda i, x: drop(base + i, x))


# ------------------------------------------------------------------------------ encoder

def run_encoder(params: Params, src_BxS: Array, cfg: ModelConfig,
                dropout: DropFn | None = None) -> tuple[Array, lstm.State]:
  """The encoder's top-layer h at every source position (SxBxH) and its final (h, c) of every
  layer (each LxBxH). `dropout(l, x)`: on layer l's input (training)."""
  b = src_BxS.shape[0]
  x_SxBxE = embed(params["src_embed"], src_BxS.T)
  mask_SxB = (src_BxS.T != PAD_ID).astype(jnp.float32)
  if cfg.encoder == "bi":
    return _bidirectional_encoder(params["encoder"], x_SxBxE, mask_SxB, cfg, dropout)
  state0 = lstm.zero_state(cfg.num_layers, b, cfg.hidden_size, params["src_embed"].dtype)
  return lstm.stack(params["encoder"], x_SxBxE, mask_SxB, state0, compute_dtype(cfg),
                    layer_fn(cfg), dropout)


def _bidirectional_encoder(layers: list, x_SxBxE: Array, mask_SxB: Array, cfg: ModelConfig,
                           dropout: DropFn | None) -> tuple[Array, lstm.State]:
  """model.encoder=bi: layer 0 in both directions (H/2 cells each), the rest as `lstm.stack`.

  The backward direction reads the time-reversed sequence; there the padding comes first and
  leaves the zero state as it is, so its final state is the one after the first word."""
  run, dtype = layer_fn(cfg), compute_dtype(cfg)
  if dropout is not None:
    x_SxBxE = dropout(0, x_SxBxE)
  zero_BxH2 = jnp.zeros((x_SxBxE.shape[1], cfg.hidden_size // 2), x_SxBxE.dtype)
  fwd_SxBxH2, (h_fwd, c_fwd) = run(layers[0]["fwd"], x_SxBxE, mask_SxB, zero_BxH2, zero_BxH2,
                                   dtype)
  bwd_SxBxH2, (h_bwd, c_bwd) = run(layers[0]["bwd"], x_SxBxE[::-1], mask_SxB[::-1], zero_BxH2,
                                   zero_BxH2, dtype)
  out_SxBxH = jnp.concatenate([fwd_SxBxH2, bwd_SxBxH2[::-1]], axis=-1)
  h0_BxH, c0_BxH = jnp.concatenate([h_fwd, h_bwd], -1), jnp.concatenate([c_fwd, c_bwd], -1)
  if len(layers) == 1:
    return out_SxBxH, lstm.State(h0_BxH[None], c0_BxH[None])
  state0 = lstm.zero_state(len(layers) - 1, x_SxBxE.shape[1], cfg.hidden_size, x_SxBxE.dtype)
  top_SxBxH, upper = lstm.stack(layers[1:], out_SxBxH, mask_SxB, state0, dtype, run,
                                _at(dropout, 1))
  return top_SxBxH, lstm.State(jnp.concatenate([h0_BxH[None], upper.h_LxBxH]),
                               jnp.concatenate([c0_BxH[None], upper.c_LxBxH]))


def encode(params: Params, src_BxS: Array, cfg: ModelConfig,
           dropout: DropFn | None = None) -> lstm.State:
  """The encoder's final (h, c) of every layer, each LxBxH."""
  return run_encoder(params, src_BxS, cfg, dropout)[1]


def decoder_inputs(tgt_BxT: Array) -> Array:
  """<s> y_1 .. y_{T-1}: the targets shifted right behind the begin symbol."""
  bos = jnp.full((tgt_BxT.shape[0], 1), BOS_ID, tgt_BxT.dtype)
  return jnp.concatenate([bos, tgt_BxT[:, :-1]], axis=1)


def project(params: Params, h: Array, cfg: ModelConfig) -> Array:
  """Logits over the target vocabulary for hidden states h (...xH -> ...xV)."""
  return lstm.matmul(h, params["softmax"]["w"], compute_dtype(cfg)) + params["softmax"]["b"]


def decode_hidden(params: Params, state: lstm.State, tgt_BxT: Array, cfg: ModelConfig,
                  dropout: DropFn | None = None) -> Array:
  """Teacher-forced decoder: top-layer h at every target position, TxBxH."""
  y_in_BxT = decoder_inputs(tgt_BxT)
  x_TxBxE = embed(params["tgt_embed"], y_in_BxT.T)
  mask_TxB = (tgt_BxT.T != PAD_ID).astype(jnp.float32)
  h_TxBxH, _ = lstm.stack(params["decoder"], x_TxBxE, mask_TxB, state, compute_dtype(cfg),
                          layer_fn(cfg), dropout)
  return h_TxBxH


# ------------------------------------------------------------------------------ attention

class Memory(NamedTuple):
  """What the attention reads from the encoder, sentences (rows) on axis -2. It is the same for
  every hypothesis of a sentence: beam search copies it once per hypothesis and never reorders
  it (`decode`)."""
  values_SxBxH: Array  # the encoder's top-layer outputs h_s
  keys_SxBxK: Array  # the score's view of h_s: W_a h_s (general), W_k h_s (concat, additive), h_s
  mask_SxBx1: Array  # 1.0 at source words, 0.0 at padding


class AttentionState(NamedTuple):
  """The decoder state of an attention model, rows on axis -2 in every leaf."""
  rnn: lstm.State  # h and c of every layer, LxBxH
  feed_BxH: Array  # the attentional vector h~ of the last step (zeros before the first)
  align_BxS: Array  # the attention weights of the last step (zeros before the first)
  memory: Memory


def _einsum(spec: str, x: Array, y: Array, dtype: jnp.dtype | None) -> Array:
  """jnp.einsum with `lstm.matmul`'s operand dtype rule."""
  if dtype is None:
    return jnp.einsum(spec, x, y)
  return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


def memory(params: Params, top_SxBxH: Array, src_BxS: Array, cfg: ModelConfig) -> Memory:
  """The attention's view of the encoder outputs, the source-side products computed once."""
  att, dtype = params["attention"], compute_dtype(cfg)
  keys_SxBxK = top_SxBxH
  if cfg.attention == "general":
    keys_SxBxK = lstm.matmul(top_SxBxH, att["w_a"], dtype)
  elif cfg.attention in ("concat", "additive"):
    keys_SxBxK = lstm.matmul(top_SxBxH, att["w_k"], dtype)
  mask_SxBx1 = (src_BxS.T != PAD_ID).astype(jnp.float32)[..., None]
  return Memory(top_SxBxH, keys_SxBxK, mask_SxBx1)


NO_WEIGHT = float(jnp.finfo(jnp.float32).min)  # the score of a position that gets weight 0


def attention_scores(att: Params, q_BxH: Array, mem: Memory, cfg: ModelConfig) -> Array:
  """score(q, h_s) for every source position s, BxS (padding not masked here)."""
  dtype = compute_dtype(cfg)
  if cfg.attention in ("concat", "additive"):
    q_BxK = lstm.matmul(q_BxH, att["w_q"], dtype)
    return jnp.einsum("sbk,k->bs", jnp.tanh(mem.keys_SxBxK + q_BxK), att["v"])
  if cfg.attention == "location":
    s, p = mem.values_SxBxH.shape[0], cfg.attention_positions
    s_BxP = lstm.matmul(q_BxH, att["w_a"], dtype)
    if s <= p:
      return s_BxP[:, :s]
    return jnp.pad(s_BxP, ((0, 0), (0, s - p)), constant_values=NO_WEIGHT)
  return _einsum("sbk,bk->bs", mem.keys_SxBxK, q_BxH, dtype)


def attend(att: Params, q_BxH: Array, mem: Memory, cfg: ModelConfig) -> tuple[Array, Array]:
  """(context c BxH, weights a BxS): a = softmax over the source words of the scores (padding
  gets weight 0; an all-padding row spreads it evenly), c = sum_s a(s) h_s."""
  s_BxS = attention_scores(att, q_BxH, mem, cfg)
  s_BxS = jnp.where(mem.mask_SxBx1[..., 0].T > 0, s_BxS, NO_WEIGHT)
  a_BxS = jax.nn.softmax(s_BxS, axis=-1)
  return _einsum("bs,sbh->bh", a_BxS, mem.values_SxBxH, compute_dtype(cfg)), a_BxS


def attentional(att: Params, c_BxH: Array, h_BxH: Array, cfg: ModelConfig) -> Array:
  """h~ = tanh(W_c [c; h]) (any leading axes)."""
  return jnp.tanh(lstm.matmul(jnp.concatenate([c_BxH, h_BxH], axis=-1), att["w_c"],
                              compute_dtype(cfg)))


def attention_step(params: Params, state: lstm.State, feed_BxH: Array, x_BxE: Array,
                   mem: Memory, cfg: ModelConfig, dropout: DropFn | None = None
                   ) -> tuple[Array, lstm.State, Array]:
  """One decoder step with attention: (h~ BxH, the new LSTM state, the weights BxS).
  `dropout(l, x)`: on layer l's input (layer 0 reads x_BxE already dropped, see `_step_path`)."""
  att = params["attention"]
  inputs = [x_BxE]
  if cfg.attention == "additive":  # Bahdanau: attend from the state before the step
    c_BxH, a_BxS = attend(att, state.h_LxBxH[-1], mem, cfg)
    inputs.append(c_BxH)
  if cfg.input_feeding:
    inputs.append(feed_BxH)
  x_in = jnp.concatenate(inputs, axis=-1) if len(inputs) > 1 else x_BxE
  h_BxH, state = lstm.stack_step(params["decoder"], x_in, state, compute_dtype(cfg), dropout)
  if cfg.attention != "additive":
    c_BxH, a_BxS = attend(att, h_BxH, mem, cfg)
  return attentional(att, c_BxH, h_BxH, cfg), state, a_BxS


def stepwise(cfg: ModelConfig) -> bool:
  """Whether teacher forcing must run the decoder step by step (module doc)."""
  return cfg.input_feeding or cfg.attention == "additive"


def attention_hidden(params: Params, mem: Memory, state: lstm.State, tgt_BxT: Array,
                     cfg: ModelConfig, dropout: DropFn | None = None) -> tuple[Array, Array]:
  """Teacher-forced attention decoder: (h~ TxBxH, weights TxBxS) at every target position."""
  att = params["attention"]
  if not stepwise(cfg):
    h_TxBxH = decode_hidden(params, state, tgt_BxT, cfg, dropout)
    c_TxBxH, a_TxBxS = jax.vmap(lambda q: attend(att, q, mem, cfg))(h_TxBxH)
    return attentional(att, c_TxBxH, h_TxBxH, cfg), a_TxBxS
  return _step_path(params, mem, state, tgt_BxT, cfg, dropout)


def _step_path(params: Params, mem: Memory, state: lstm.State, tgt_BxT: Array,
               cfg: ModelConfig, dropout: DropFn | None) -> tuple[Array, Array]:
  """`attention_hidden` as a scan over time. Dropout masks are drawn for all steps at once, at
  the sites and in the shapes of the layer-major path."""
  x_TxBxE = embed(params["tgt_embed"], decoder_inputs(tgt_BxT).T)
  t, b = x_TxBxE.shape[:2]
  scales = None
  if dropout is not None:
    x_TxBxE = dropout(0, x_TxBxE)
    ones_TxBxH = jnp.ones((t, b, cfg.hidden_size), x_TxBxE.dtype)
    scales = [dropout(i, ones_TxBxH) for i in range(1, cfg.num_layers)] or None

  def step(carry, inputs):
    state, feed_BxH = carry
    x_BxE, scales_t = inputs  # scales_t: layer l's dropout scale at this step, BxH, l >= 1
    drop = None if scales_t is None else (lambda i, x: x * scales_t[i - 1] if i else x)
    out_BxH, state, a_BxS = attention_step(params, state, feed_BxH, x_BxE, mem, cfg, drop)
    return (state, out_BxH), (out_BxH, a_BxS)

  feed0_BxH = jnp.zeros((b, cfg.hidden_size), x_TxBxE.dtype)
  _, (out_TxBxH, a_TxBxS) = jax.lax.scan(step, (state, feed0_BxH), (x_TxBxE, scales))
  return out_TxBxH, a_TxBxS


# ------------------------------------------------------------------------------ outputs

def decoder_outputs(params: Params, batch: dict[str, Array], cfg: ModelConfig,
                    keys_B: Array | None = None) -> Array:
  """What the softmax reads at every target position, TxBxH: the decoder's top h, or the
  attentional vector h~ with attention. `keys_B` (training with model.dropout): `row_keys`."""
  drop = dropout_fn(cfg.dropout, keys_B) if keys_B is not None and cfg.dropout else None
  enc_drop, dec_drop = _at(drop, ENCODER_SITE), _at(drop, DECODER_SITE)
  if cfg.attention == "none":
    state = encode(params, batch["src"], cfg, enc_drop)
    out_TxBxH = decode_hidden(params, state, batch["tgt"], cfg, dec_drop)
  else:
    top_SxBxH, state = run_encoder(params, batch["src"], cfg, enc_drop)
    mem = memory(params, top_SxBxH, batch["src"], cfg)
    out_TxBxH, _ = attention_hidden(params, mem, state, batch["tgt"], cfg, dec_drop)
  return out_TxBxH if drop is None else drop(OUTPUT_SITE, out_TxBxH)


def target_log_probs(params: Params, h_TxBxH: Array, tgt_TxB: Array, cfg: ModelConfig,
                     label_smoothing: float = 0.0) -> Array | tuple[Array, Array]:
  """log p(tgt | h) under the full softmax, TxB (padding positions not masked).

  With `label_smoothing` > 0: (that, the token losses TxB), the cross-entropy with the targets
  smoothed by optax.smooth_labels, -(1 - e) log p(tgt) - e/V sum_v log p(v) (plain JAX)."""
  if label_smoothing:
    logits_TxBxV = project(params, h_TxBxH, cfg)
    labels_TxBxV = optax.smooth_labels(
        jax.nn.one_hot(tgt_TxB, logits_TxBxV.shape[-1], dtype=logits_TxBxV.dtype), label_smoothing)
    logp_TxBxV = jax.nn.log_softmax(logits_TxBxV, axis=-1)
    lp_TxB = jnp.take_along_axis(logp_TxBxV, tgt_TxB[..., None], axis=-1)[..., 0]
    return lp_TxB, optax.softmax_cross_entropy(logits_TxBxV, labels_TxBxV)
  if cpu_kernels_on(cfg):
    return cpu_kernels.softmax_pick(params["softmax"], h_TxBxH, tgt_TxB, compute_dtype(cfg))
  logp_TxBxV = jax.nn.log_softmax(project(params, h_TxBxH, cfg), axis=-1)
  return jnp.take_along_axis(logp_TxBxV, tgt_TxB[..., None], axis=-1)[..., 0]


def token_log_probs(params: Params, batch: dict[str, Array], cfg: ModelConfig,
                    pick: Callable = target_log_probs, keys_B: Array | None = None) -> Array:
  """log p(y_t | x, y_<t) of every target token, BxT, 0 at padding.

  `pick(params, h_TxBxH, tgt_TxB, cfg) -> TxB` turns decoder states into target log
  probabilities; the default is the full softmax, `parallel` passes a vocabulary-sharded one.
  `keys_B`: dropout keys (`decoder_outputs`).
  """
  h_TxBxH = decoder_outputs(params, batch, cfg, keys_B)
  tgt_TxB = batch["tgt"].T
  lp_TxB = pick(params, h_TxBxH, tgt_TxB, cfg)
  return jnp.where(tgt_TxB != PAD_ID, lp_TxB, 0.0).T


def loss_fn(params: Params, batch: dict[str, Array], cfg: ModelConfig,
            pick: Callable = target_log_probs, *, rng: Array | None = None,
            first_row: Array | int = 0, label_smoothing: float = 0.0) -> tuple[Array, dict]:
  """The paper's loss: summed token NLL over the batch divided by the number of sentences.

  Sentences are the rows with at least one target token, so all-padding rows (used to fill
  a batch) neither add to the sum nor to the divisor. `pick`: see `token_log_probs`.

  Training switches: `rng` (model.dropout > 0), the step's dropout key, row i of the batch
  being global row first_row + i (see `row_keys`); `label_smoothing` > 0: the loss sums the
  smoothed token losses instead (`pick(..., label_smoothing=e)` returns (log p, losses)), put
  in aux as "loss_sum"; nll_sum stays the NLL (perplexity).
  """
  keys_B = None if rng is None else row_keys(rng, batch["tgt"].shape[0], first_row)
  if not label_smoothing:
    lp_BxT = token_log_probs(params, batch, cfg, pick, keys_B)
    nll_sum = -jnp.sum(lp_BxT)
    num_tokens = jnp.sum(batch["tgt"] != PAD_ID)
    num_sents = jnp.sum(jnp.any(batch["tgt"] != PAD_ID, axis=1))
    loss = nll_sum / jnp.maximum(num_sents, 1)
    return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens, "num_sents": num_sents}
  num_tokens = jnp.sum(batch["tgt"] != PAD_ID)
  num_sents = jnp.sum(jnp.any(batch["tgt"] != PAD_ID, axis=1))
  tgt_TxB = batch["tgt"].T
  lp_TxB, tok_loss_TxB = pick(params, decoder_outputs(params, batch, cfg, keys_B), tgt_TxB, cfg,
                              label_smoothing=label_smoothing)
  real_TxB = tgt_TxB != PAD_ID
  loss_sum = jnp.sum(jnp.where(real_TxB, tok_loss_TxB, 0.0))
  nll_sum = -jnp.sum(jnp.where(real_TxB, lp_TxB, 0.0))
  return loss_sum / jnp.maximum(num_sents, 1), {
      "nll_sum": nll_sum, "num_tokens": num_tokens, "num_sents": num_sents, "loss_sum": loss_sum}


DecoderState = lstm.State | AttentionState


def initial_state(params: Params, src_BxS: Array, cfg: ModelConfig) -> DecoderState:
  """The decoder's state before the first step: the encoder's final state (`encode`), with
  attention also the memory and zero feed and weights."""
  if cfg.attention == "none":
    return encode(params, src_BxS, cfg)
  top_SxBxH, state = run_encoder(params, src_BxS, cfg)
  b, s = src_BxS.shape
  return AttentionState(state, jnp.zeros((b, cfg.hidden_size), top_SxBxH.dtype),
                        jnp.zeros((b, s), jnp.float32), memory(params, top_SxBxH, src_BxS, cfg))


def decoder_step(params: Params, state: DecoderState, y_prev_B: Array,
                 cfg: ModelConfig) -> tuple[Array, DecoderState]:
  """One decoding step: log p(. | state, y_prev) as BxV, and the new state."""
  x_BxE = embed(params["tgt_embed"], y_prev_B)
  if cfg.attention == "none":
    h_BxH, state = lstm.stack_step(params["decoder"], x_BxE, state, compute_dtype(cfg))
  else:
    h_BxH, st, a_BxS = attention_step(params, state.rnn, state.feed_BxH, x_BxE, state.memory,
                                      cfg)
    state = AttentionState(st, h_BxH, a_BxS, state.memory)
  logits_BxV = project(params, h_BxH, cfg)
  if cpu_kernels_on(cfg):
    return cpu_kernels.log_softmax(logits_BxV), state
  return jax.nn.log_softmax(logits_BxV, axis=-1), state
