"""Kernels for XLA's CPU backend: hand-written backward passes of the LSTM layer and of the
softmax loss, and a decoding log-softmax, in the shapes XLA's CPU backend runs fastest.

Used only where they were measured to pay: model.kernels=auto picks them when JAX's default
backend is the CPU, plain JAX (`lstm`, `model`) everywhere else; model.kernels=cpu / plain
forces either. They compute the same functions as the plain code (tests/test_cpu_kernels.py
checks values and gradients against autodiff). Whole-step figures: BENCHMARKS.md.

- `fused_layer`: `lstm.layer` with a custom VJP. The reverse scan does only the gate math and
  dz @ w_h^T per step; the weight gradients are then one matmul each over all T*B rows instead
  of T small ones accumulated in the loop. The forward computes the four gate activations in
  one elementwise pass (sigmoid(z) = tanh(z/2)/2 + 1/2), keeps them for the backward, and in
  float32 adds b in that pass rather than in a pass of its own.
- `softmax_pick`: log p(target) under the full softmax with a custom VJP that keeps only the
  logits and forms d logits = g * (onehot - softmax) in one pass. In float32 the bias rides in
  the products, logits = [h, 1] @ [w; b] and [dw; db] = [h, 1]^T @ d logits, which saves a
  pass over the logits and the bias gradient's own reduction (about 5% of the softmax's
  forward and backward); with bfloat16 operands b is still added in float32.
- `log_softmax`: x - (max + log sum exp(x - max)), which XLA's CPU backend runs faster than
  jax.nn.log_softmax inside a decoding step. Not for gradients.
- `argmax`: greedy decoding's arg-max as a max and a min reduction, which XLA's CPU backend
  runs about 8x faster than argmax's (value, index) reduction (13 ms -> 1.5 ms a step for
  128 x 16k logits, a quarter of a medium greedy step).
- Products of the backward passes take the left operand of x^T @ y as a materialised
  transpose (`transposed`). The reverse scan's dz @ w_h^T reads a w_h^T made once before the
  loop (a plain product; about 9% faster per step than contracting w_h in place), and the
  products outside the loop contract w on its last axis in place (`matmul_nt`), where both
  layouts measure the same.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import lstm

Array = jax.Array


def matmul_nt(x_NxK: Array, w_MxK: Array, dtype: jnp.dtype | None = None) -> Array:
  """x @ w.T (NxM) without forming w.T; with `dtype` as `lstm.matmul`."""
  if dtype is not None:
    x_NxK, w_MxK = x_NxK.astype(dtype), w_MxK.astype(dtype)
  return jax.lax.dot_general(x_NxK, w_MxK, (((x_NxK.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=None if dtype is None else jnp.float32)


def transposed(x_NxK: Array) -> Array:
  """x as a new row-major KxN array (x may be ...xK; N = the product of its leading axes).

  A 3-D x has its last axis moved to the front in one pass; a 2-D x is split into 3-D first,
  since XLA folds a plain 2-D x.T back into the dot that reads it.
  """
  if x_NxK.ndim == 2:
    a = x_NxK.shape[0]
    k = next((d for d in range(2, math.isqrt(a) + 1) if a % d == 0), 1)
    x_NxK = x_NxK.reshape(k, a // k, -1)
  return jnp.moveaxis(x_NxK, -1, 0).reshape(x_NxK.shape[-1], -1)


def weight_and_bias_grads(x_NxK: Array, dy_NxM: Array,
                          dtype: jnp.dtype | None) -> tuple[Array, Array]:
  """(x^T dy, column sums of dy): the gradients of y = x @ w + b (x may be ...xK)."""
  ones_1xN = jnp.ones((1, dy_NxM.shape[0]), dy_NxM.dtype)
  return (lstm.matmul(transposed(x_NxK), dy_NxM, dtype),
          lstm.matmul(ones_1xN, dy_NxM, dtype)[0])


def gates(z_BxG: Array) -> Array:
  """(sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)) concatenated, in one elementwise pass:
  tanh(z * s) * s + (1 - s) with s = 1/2 on the sigmoid columns, 1 on the cell column."""
  hsz = z_BxG.shape[-1] // 4
  col_G = jnp.arange(4 * hsz)
  s_G = jnp.where((col_G >= 2 * hsz) & (col_G < 3 * hsz), 1.0, 0.5).astype(z_BxG.dtype)
  return jnp.tanh(z_BxG * s_G) * s_G + (1.0 - s_G)


def _forward(params: lstm.LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array,
             c0_BxH: Array, dtype: jnp.dtype | None):
  """The recurrence, keeping what the backward reads: ((h_T, c_T), (h, c, gates per step))."""
  gx_TxBxG = lstm.matmul(x_TxBxI, params["w_x"], dtype)
  b_G = params["b"]
  w_h = params["w_h"] if dtype is None else params["w_h"].astype(dtype)

  def step(carry, inputs):
    h, c = carry
    gx_BxG, m_B = inputs
    gates_BxG = gates(gx_BxG + b_G + lstm.matmul(h, w_h, dtype))
    i, f, g, o = jnp.split(gates_BxG, 4, axis=-1)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    keep = m_B[:, None] > 0
    h, c = jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)
    return (h, c), (h, c, gates_BxG)

  return jax.lax.scan(step, (h0_BxH, c0_BxH), (gx_TxBxG, mask_TxB))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_layer(params: lstm.LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array,
                c0_BxH: Array, dtype: jnp.dtype | None = None) -> tuple[Array, tuple[Array, Array]]:
  """`lstm.layer` with the hand-written backward pass described in the module doc."""
  (h_T, c_T), (h_TxBxH, _, _) = _forward(params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype)
  return h_TxBxH, (h_T, c_T)


def _fused_layer_fwd(params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype):
  (h_T, c_T), (h_TxBxH, c_TxBxH, gates_TxBxG) = _forward(
      params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype)
  res = (params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, h_TxBxH, c_TxBxH, gates_TxBxG)
  return (h_TxBxH, (h_T, c_T)), res


def _fused_layer_bwd(dtype, res, cotangents):
  params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, h_TxBxH, c_TxBxH, gates_TxBxG = res
  dh_TxBxH, (dh_T, dc_T) = cotangents
  cd = x_TxBxI.dtype if dtype is None else dtype  # dtype of the backward matmul operands
  h_prev_TxBxH = jnp.concatenate([h0_BxH[None], h_TxBxH[:-1]], axis=0)
  c_prev_TxBxH = jnp.concatenate([c0_BxH[None], c_TxBxH[:-1]], axis=0)
  w_h_GxH = transposed(params["w_h"]).astype(cd)  # w_h^T, made once (module doc)

  def step(carry, inputs):
    dh, dc = carry  # cotangents of the carried h_t, c_t
    dh_out, m_B, gates_BxG, c_prev, c_t = inputs
    dh = dh + dh_out
    keep = m_B[:, None] > 0  # a padding step passed h and c through unchanged
    dh_new = jnp.where(keep, dh, 0.0)
    dc_new = jnp.where(keep, dc, 0.0)
    i, f, g, o = jnp.split(gates_BxG, 4, axis=-1)
    tanh_c = jnp.tanh(c_t)  # c_t is the step's new c wherever keep
    dc_new = dc_new + dh_new * o * (1.0 - tanh_c * tanh_c)
    dz_BxG = jnp.concatenate([dc_new * g * i * (1.0 - i), dc_new * c_prev * f * (1.0 - f),
                              dc_new * i * (1.0 - g * g), dh_new * tanh_c * o * (1.0 - o)], axis=-1)
    dz_BxG = dz_BxG.astype(cd)
    dh_prev = lstm.matmul(dz_BxG, w_h_GxH, dtype) + jnp.where(keep, 0.0, dh)
    dc_prev = dc_new * f + jnp.where(keep, 0.0, dc)
    return (dh_prev, dc_prev), dz_BxG

  (dh0_BxH, dc0_BxH), dz_TxBxG = jax.lax.scan(
      step, (dh_T, dc_T), (dh_TxBxH, mask_TxB, gates_TxBxG, c_prev_TxBxH, c_TxBxH), reverse=True)
  t, b, g = dz_TxBxG.shape
  dz_NxG = dz_TxBxG.reshape(t * b, g)  # N = T*B rows: one matmul per gradient
  dw_x, db = weight_and_bias_grads(x_TxBxI, dz_NxG, dtype)
  dw_h = lstm.matmul(transposed(h_prev_TxBxH.astype(cd)), dz_NxG, dtype)
  grads = {k: v.astype(params[k].dtype) for k, v in (("w_x", dw_x), ("w_h", dw_h), ("b", db))}
  dx_TxBxI = matmul_nt(dz_NxG, params["w_x"].astype(cd), dtype).reshape(x_TxBxI.shape)
  return (grads, dx_TxBxI.astype(x_TxBxI.dtype), _zero_cotangent(mask_TxB),
          dh0_BxH.astype(h0_BxH.dtype), dc0_BxH.astype(c0_BxH.dtype))


def _zero_cotangent(x: Array) -> Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


fused_layer.defvjp(_fused_layer_fwd, _fused_layer_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_pick(softmax: dict, h_TxBxH: Array, tgt_TxB: Array,
                 dtype: jnp.dtype | None) -> Array:
  """log softmax(h @ w + b)[target], TxB, with the hand-written backward pass."""
  return _softmax_pick_fwd(softmax, h_TxBxH, tgt_TxB, dtype)[0]


def _with_ones(x_NxK: Array) -> Array:
  """[x, 1]: x with a column of ones, so that [x, 1] @ [w; b] = x @ w + b in one product."""
  return jnp.concatenate([x_NxK, jnp.ones((*x_NxK.shape[:-1], 1), x_NxK.dtype)], axis=-1)


def _softmax_pick_fwd(softmax, h_TxBxH, tgt_TxB, dtype):
  if dtype is None:  # float32: the bias rides in the product, [h, 1] @ [w; b]
    wb_H1xV = jnp.concatenate([softmax["w"], softmax["b"][None]])
    logits_TxBxV = lstm.matmul(_with_ones(h_TxBxH), wb_H1xV)
  else:  # low-precision operands: the bias is added in float32
    logits_TxBxV = lstm.matmul(h_TxBxH, softmax["w"], dtype) + softmax["b"]
  max_TxBx1 = jnp.max(logits_TxBxV, axis=-1, keepdims=True)
  lse_TxBx1 = jnp.log(jnp.sum(jnp.exp(logits_TxBxV - max_TxBx1), axis=-1, keepdims=True))
  picked_TxBx1 = jnp.take_along_axis(logits_TxBxV, tgt_TxB[..., None], axis=-1) - max_TxBx1
  lp_TxB = (picked_TxBx1 - lse_TxBx1)[..., 0]
  return lp_TxB, (softmax, h_TxBxH, tgt_TxB, logits_TxBxV, max_TxBx1 + lse_TxBx1)


def _softmax_pick_bwd(dtype, res, g_TxB):
  softmax, h_TxBxH, tgt_TxB, logits_TxBxV, norm_TxBx1 = res
  cd = dtype or h_TxBxH.dtype
  v = logits_TxBxV.shape[-1]
  onehot_TxBxV = jnp.arange(v) == tgt_TxB[..., None]
  dlogits_TxBxV = g_TxB[..., None] * (onehot_TxBxV - jnp.exp(logits_TxBxV - norm_TxBx1))
  dlogits_NxV = dlogits_TxBxV.astype(cd).reshape(-1, v)  # N = T*B rows
  if dtype is None:  # [dw; db] = [h, 1]^T dlogits
    dwb_H1xV = lstm.matmul(transposed(_with_ones(h_TxBxH)), dlogits_NxV)
    dw, db = dwb_H1xV[:-1], dwb_H1xV[-1]
  else:
    dw, db = weight_and_bias_grads(h_TxBxH, dlogits_NxV, dtype)
  grads = {"w": dw.astype(softmax["w"].dtype), "b": db.astype(softmax["b"].dtype)}
  dh_NxH = matmul_nt(dlogits_NxV, softmax["w"].astype(cd), dtype)
  return grads, dh_NxH.reshape(h_TxBxH.shape).astype(h_TxBxH.dtype), None


softmax_pick.defvjp(_softmax_pick_fwd, _softmax_pick_bwd)


def log_softmax(logits: Array) -> Array:
  """log softmax over the last axis as x - (max + log sum exp(x - max)). Not for gradients."""
  max_ = jnp.max(logits, axis=-1, keepdims=True)
  return logits - (max_ + jnp.log(jnp.sum(jnp.exp(logits - max_), axis=-1, keepdims=True)))


def argmax(x_RxV: Array) -> Array:
  """jnp.argmax(x, axis=-1) as int32 (the first maximum; a NaN counts as the maximum)."""
  v = x_RxV.shape[-1]
  hit_RxV = (x_RxV == jnp.max(x_RxV, axis=-1, keepdims=True)) | jnp.isnan(x_RxV)
  return jnp.min(jnp.where(hit_RxV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
