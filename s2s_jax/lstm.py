"""A deep LSTM as pure functions over parameter pytrees.

Shapes: B batch, T time, I layer input size, H hidden size, G = 4H gates, L layers.
Gate order in the fused matrices is (input, forget, cell, output).

The recurrent step (`cell`) does only the h-projection and the gate math; the input
projection of a layer, x @ w_x + b, is one matmul over all time steps done before the
scan (`layer`), the way cuDNN-style LSTM kernels split the work (in float32, b is added
in the step). For step-at-a-time use (decoding) `stack_step` runs all layers for one
time step.

Masking: where mask is 0 (padding) the state is carried through unchanged, so a padded
sentence ends with exactly the state it would have alone.

`fused_layer` is `layer` with a hand-written backward pass (what `stack(custom_vjp=True)`
runs; the model uses it unless model.custom_vjp=false): the reverse scan does only the gate
math and dz @ w_h^T per step, and the weight gradients are then one matmul each over all
time steps (T*B rows) instead of T small ones accumulated in the loop. Every backward matmul
takes its operands in the compute dtype with a float32 result, so a bfloat16 model also
runs its backward products in bfloat16 (autodiff would turn them into float32 products).
Under differentiation with a 16-bit compute dtype its forward returns h rounded to that dtype
(`_scan_layer`); everything downstream rounds h so anyway, so the loss is exactly `layer`'s.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LayerParams = dict  # {"w_x": IxG, "w_h": HxG, "b": G}


class State(NamedTuple):
  """LSTM state of every layer: h and c, each LxBxH."""
  h_LxBxH: Array
  c_LxBxH: Array


def init_layer(key: Array, input_size: int, hidden_size: int, scale: float) -> LayerParams:
  """One layer's parameters, all U(-scale, scale) as in the paper."""
  k_x, k_h, k_b = jax.random.split(key, 3)
  g = 4 * hidden_size
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -scale, scale)
  return {"w_x": u(k_x, (input_size, g)), "w_h": u(k_h, (hidden_size, g)), "b": u(k_b, (g,))}


def init_stack(key: Array, num_layers: int, input_size: int, hidden_size: int,
               scale: float) -> list[LayerParams]:
  """L layers; layer 0 reads the input, layer l > 0 reads layer l-1's h."""
  keys = jax.random.split(key, num_layers)
  return [init_layer(k, input_size if i == 0 else hidden_size, hidden_size, scale)
          for i, k in enumerate(keys)]


def zero_state(num_layers: int, batch: int, hidden_size: int,
               dtype: jnp.dtype = jnp.float32) -> State:
  z = jnp.zeros((num_layers, batch, hidden_size), dtype)
  return State(z, z)


def matmul(x: Array, w: Array, dtype: jnp.dtype | None = None) -> Array:
  """x @ w; with `dtype`, operands are cast to it and the result is float32."""
  if dtype is None:
    return jnp.matmul(x, w)
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def affine(x: Array, w_KxM: Array, b_M: Array, dtype: jnp.dtype | None = None) -> Array:
  """x @ w + b (x: ...xK); with `dtype` as `matmul`.

  With a 16-bit `dtype` it is one matmul [x, 1, 1] @ [w; b_hi; b_lo] (b split in two rows so
  that it keeps ~16 significant bits): the rows cost nothing there and save XLA's CPU backend a
  pass over the (large) result. A float32 product is 1.3x slower with K = 513 than with 512 on
  an AVX2-only CPU (BENCHMARKS.md), so float32 adds b separately; XLA fuses that add into the
  result's consumers where it can. The two float32 forms agreed to the bit where compared.
  """
  if dtype is None:
    return matmul(x, w_KxM) + b_M
  ones = jnp.ones(x.shape[:-1] + (1,), dtype)
  b_hi = b_M.astype(dtype)
  b_lo = (b_M - b_hi.astype(b_M.dtype)).astype(dtype)
  x_aug = jnp.concatenate([x.astype(dtype), ones, ones], -1)
  return matmul(x_aug, jnp.concatenate([w_KxM.astype(dtype), b_hi[None], b_lo[None]], 0), dtype)


def matmul_nt(x_NxK: Array, w_MxK: Array, dtype: jnp.dtype | None = None) -> Array:
  """x @ w.T (NxM) without forming w.T; with `dtype` as `matmul`.

  XLA's CPU matmul library takes a right operand contracted on its last axis as it is, and
  runs it at least as fast as a materialised transpose: 1.06-1.3x faster for the per-step
  dz @ w_h^T of the LSTM backward, the same for the large products (BENCHMARKS.md).
  """
  if dtype is not None:
    x_NxK, w_MxK = x_NxK.astype(dtype), w_MxK.astype(dtype)
  return jax.lax.dot_general(x_NxK, w_MxK, (((x_NxK.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=None if dtype is None else jnp.float32)


def gate_matmul_nt(dz_NxG: Array, w_MxG: Array, dtype: jnp.dtype | None) -> Array:
  """dz @ w.T over the gate axis (G = 4H): `matmul_nt`, for G >= 2048 in a 16-bit dtype as the
  sum of two products over the halves of G.

  XLA's CPU matmul library runs products with K = 2048 slower per FLOP than with K = 1024
  (3840 x K x 512 in bf16: 264 against 353 GFLOP/s). Measured on the LSTM backward (both the
  per-step dh and the dx products): 0.95x the time at H = 512, 0.98x at H = 1000; halves of
  512 columns were slower (1.05x at H = 256), hence the threshold (BENCHMARKS.md).
  """
  if dtype is None or dz_NxG.shape[-1] < 2048:
    return matmul_nt(dz_NxG, w_MxG, dtype)
  dz_a, dz_b = jnp.split(dz_NxG, 2, axis=-1)
  w_a, w_b = jnp.split(w_MxG, 2, axis=-1)
  return matmul_nt(dz_a, w_a, dtype) + matmul_nt(dz_b, w_b, dtype)


def transposed(x_NxK: Array) -> Array:
  """x as a new row-major KxN array, to be the left operand of x^T @ y. x may be ...xK, with
  N the product of its leading axes.

  XLA's CPU backend runs a dot contracted on the left operand's first axis about 1.3x slower
  than the same dot on a materialised transpose, and folds a plain x.T back into the dot.
  Moving the last axis of a 3-D x to the front is materialised. Done on activations in their
  own TxBxK layout it is one pass, 3x faster (2 ms against 7 for 30x128x512 float32) than
  transposing their 2-D reshape, whose indices cross the T and B axes. A 2-D x is split into
  3-D first (BENCHMARKS.md).
  """
  if x_NxK.ndim == 2:
    a = x_NxK.shape[0]
    k = next((d for d in range(2, math.isqrt(a) + 1) if a % d == 0), 1)
    x_NxK = x_NxK.reshape(k, a // k, -1)
  return jnp.moveaxis(x_NxK, -1, 0).reshape(x_NxK.shape[-1], -1)


def weight_and_bias_grads(x_NxK: Array, dy_NxM: Array,
                          dtype: jnp.dtype | None) -> tuple[Array, Array]:
  """(x^T dy, column sums of dy): the gradients of y = x @ w + b (x may be ...xK, as in
  `transposed`).

  In float32 the column sums are a separate ones @ dy: the one-row product reads dy once,
  and an extra row on x^T made the large products 1.04-1.07x slower on an AVX2-only CPU. In a
  16-bit dtype the sums are that extra row, [x^T; 1] @ dy: XLA's CPU backend ran a separate
  sum of a large bfloat16 dy slower (about 80 ms vs ~0 for a 3840 x 16k dy). BENCHMARKS.md.
  """
  if dtype is None:
    ones_1xN = jnp.ones((1, dy_NxM.shape[0]), dy_NxM.dtype)
    return matmul(transposed(x_NxK), dy_NxM), matmul(ones_1xN, dy_NxM)[0]
  x_NxK1 = jnp.concatenate([x_NxK.astype(dy_NxM.dtype),
                            jnp.ones(x_NxK.shape[:-1] + (1,), dy_NxM.dtype)], axis=-1)
  out_KxM = matmul(transposed(x_NxK1), dy_NxM, dtype)
  return out_KxM[:-1], out_KxM[-1]


def _cell_gates(w_h_HxG: Array, gx_BxG: Array, h_BxH: Array, c_BxH: Array,
                dtype: jnp.dtype | None) -> tuple[Array, Array, Array]:
  """`cell`, also returning the gate activations (i, f, g, o) concatenated, BxG.

  All four activations are one elementwise pass, tanh(z * s) * s + t with s = 1/2, t = 1/2 on
  the sigmoid columns (sigmoid(z) = tanh(z/2)/2 + 1/2) and s = 1, t = 0 on the cell column:
  XLA's CPU backend otherwise runs one loop per gate and a concatenation (BENCHMARKS.md).
  It differs from 1/(1 + exp(-z)) by at most 2e-7.
  """
  z_BxG = gx_BxG + matmul(h_BxH, w_h_HxG, dtype)
  hsz = z_BxG.shape[-1] // 4
  col_G = jnp.arange(4 * hsz)
  s_G = jnp.where((col_G >= 2 * hsz) & (col_G < 3 * hsz), 1.0, 0.5).astype(z_BxG.dtype)
  gates_BxG = jnp.tanh(z_BxG * s_G) * s_G + (1.0 - s_G)
  i, f, g, o = jnp.split(gates_BxG, 4, axis=-1)
  c_BxH = f * c_BxH + i * g
  h_BxH = o * jnp.tanh(c_BxH)
  return h_BxH, c_BxH, gates_BxG


def cell(w_h_HxG: Array, gx_BxG: Array, h_BxH: Array, c_BxH: Array,
         dtype: jnp.dtype | None = None) -> tuple[Array, Array]:
  """One LSTM step given the precomputed input projection gx = x @ w_x + b."""
  h_BxH, c_BxH, _ = _cell_gates(w_h_HxG, gx_BxG, h_BxH, c_BxH, dtype)
  return h_BxH, c_BxH


def _scan_layer(params: LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array,
                c0_BxH: Array, dtype: jnp.dtype | None, keep_gates: bool):
  """The forward recurrence. Returns ((h_T, c_T), (h TxBxH, c TxBxH, gates TxBxG or None)).

  keep_gates (the forward of `fused_layer`) with a 16-bit `dtype` carries and returns h in that
  dtype: every reader of h (the next step's and the next layer's matmuls, the softmax, the weight
  gradients) rounds it to `dtype` anyway, and each step saves a conversion pass and half of h's
  stores. Otherwise h stays in h0's dtype, so autodiff of `layer` keeps float32 cotangents.
  """
  if dtype is None:  # float32: b is added in the step's gate pass, not in a pass of its own
    gx_TxBxG, b_G = matmul(x_TxBxI, params["w_x"]), params["b"]
  else:
    gx_TxBxG, b_G = affine(x_TxBxI, params["w_x"], params["b"], dtype), None
  w_h = params["w_h"] if dtype is None else params["w_h"].astype(dtype)  # cast once, not per step
  h_dtype = dtype if keep_gates and dtype is not None else h0_BxH.dtype

  def step(carry, inputs):
    h, c = carry
    gx_BxG, m_B = inputs
    if b_G is not None:
      gx_BxG = gx_BxG + b_G
    h_new, c_new, gates_BxG = _cell_gates(w_h, gx_BxG, h, c, dtype)
    keep = m_B[:, None] > 0
    h = jnp.where(keep, h_new.astype(h_dtype), h)
    c = jnp.where(keep, c_new, c)
    return (h, c), (_as_bits(h), c, gates_BxG) if keep_gates else h

  (h_T, c_T), outs = jax.lax.scan(step, (h0_BxH.astype(h_dtype), c0_BxH), (gx_TxBxG, mask_TxB))
  if not keep_gates:
    return (h_T, c_T), outs
  h_bits, c_TxBxH, gates_TxBxG = outs  # the custom VJP differentiates this path, not autodiff
  return (h_T, c_T), (jax.lax.bitcast_convert_type(h_bits, h_dtype), c_TxBxH, gates_TxBxG)


def layer(params: LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array, c0_BxH: Array,
          dtype: jnp.dtype | None = None) -> tuple[Array, tuple[Array, Array]]:
  """Runs one layer over time. Returns (h for every step TxBxH, final (h, c))."""
  (h_T, c_T), h_TxBxH = _scan_layer(params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype, False)
  return h_TxBxH, (h_T, c_T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_layer(params: LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array,
                c0_BxH: Array, dtype: jnp.dtype | None = None) -> tuple[Array, tuple[Array, Array]]:
  """`layer` with the hand-written backward pass described in the module doc."""
  return layer(params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype)


def _fused_layer_fwd(params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype):
  (h_T, c_T), (h_TxBxH, c_TxBxH, gates_TxBxG) = _scan_layer(
      params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, dtype, True)
  res = (params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, h_TxBxH, c_TxBxH, gates_TxBxG)
  return (h_TxBxH.astype(h0_BxH.dtype), (h_T.astype(h0_BxH.dtype), c_T)), res


def _fused_layer_bwd(dtype, res, cotangents):
  params, x_TxBxI, mask_TxB, h0_BxH, c0_BxH, h_TxBxH, c_TxBxH, gates_TxBxG = res
  dh_TxBxH, (dh_T, dc_T) = cotangents
  cd = x_TxBxI.dtype if dtype is None else dtype  # dtype of the backward matmul operands
  h_prev_TxBxH = jnp.concatenate([h0_BxH[None].astype(h_TxBxH.dtype), h_TxBxH[:-1]], axis=0)
  c_prev_TxBxH = jnp.concatenate([c0_BxH[None], c_TxBxH[:-1]], axis=0)
  # dz @ w_h^T per step with w_h contracted in place (no transpose): 16-bit products run
  # 1.06-1.3x faster so on AVX-512 CPUs, and float32 backward scans ran ~1.2x faster so on an
  # AVX2-only CPU (on the AVX-512 one a materialised transpose had been 7% faster for the
  # float32 product alone; BENCHMARKS.md).
  w_h_HxG = params["w_h"].astype(cd)
  recurrent = lambda dz_BxG: gate_matmul_nt(dz_BxG, w_h_HxG, dtype)

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
    dh_prev = recurrent(dz_BxG) + jnp.where(keep, 0.0, dh)
    dc_prev = dc_new * f + jnp.where(keep, 0.0, dc)
    return (dh_prev, dc_prev), _as_bits(dz_BxG)

  (dh0_BxH, dc0_BxH), dz_TxBxG = jax.lax.scan(
      step, (dh_T, dc_T), (dh_TxBxH, mask_TxB, gates_TxBxG, c_prev_TxBxH, c_TxBxH), reverse=True)
  dz_TxBxG = jax.lax.bitcast_convert_type(dz_TxBxG, cd)
  t, b, g = dz_TxBxG.shape
  dz_NxG = dz_TxBxG.reshape(t * b, g)  # N = T*B rows: one matmul per gradient
  dw_x, db = weight_and_bias_grads(x_TxBxI, dz_NxG, dtype)
  dw_h = matmul(transposed(h_prev_TxBxH.astype(cd)), dz_NxG, dtype)
  grads = {k: v.astype(params[k].dtype) for k, v in (("w_x", dw_x), ("w_h", dw_h), ("b", db))}
  dx_TxBxI = gate_matmul_nt(dz_NxG, params["w_x"].astype(cd), dtype).reshape(x_TxBxI.shape)
  return (grads, dx_TxBxI.astype(x_TxBxI.dtype), _zero_cotangent(mask_TxB),
          dh0_BxH.astype(h0_BxH.dtype), dc0_BxH.astype(c0_BxH.dtype))


def _as_bits(x: Array) -> Array:
  """16-bit floats as uint16 (same bits), for scan outputs: XLA's CPU backend writes a bfloat16
  scan output by converting the whole TxBxG buffer to float32 and back at every step."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _zero_cotangent(x: Array) -> Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


fused_layer.defvjp(_fused_layer_fwd, _fused_layer_bwd)


def stack(layers: list[LayerParams], x_TxBxI: Array, mask_TxB: Array, state: State,
          dtype: jnp.dtype | None = None, custom_vjp: bool = False) -> tuple[Array, State]:
  """Runs L layers layer-major over the whole sequence.

  Returns the top layer's h at every step (TxBxH) and the final state of every layer.
  custom_vjp=True runs `fused_layer` (same loss, gradients equal to rounding, faster, reverse
  mode only).
  """
  run_layer = fused_layer if custom_vjp else layer
  hs, cs = [], []
  inp = x_TxBxI
  for l, p in enumerate(layers):
    inp, (h, c) = run_layer(p, inp, mask_TxB, state.h_LxBxH[l], state.c_LxBxH[l], dtype)
    hs.append(h)
    cs.append(c)
  return inp, State(jnp.stack(hs), jnp.stack(cs))


def stack_step(layers: list[LayerParams], x_BxI: Array, state: State,
               dtype: jnp.dtype | None = None) -> tuple[Array, State]:
  """One time step through all L layers (for decoding). Returns (top h BxH, new state)."""
  hs, cs = [], []
  inp = x_BxI
  for l, p in enumerate(layers):
    gx = affine(inp, p["w_x"], p["b"], dtype)  # as `layer` computes it
    h, c = cell(p["w_h"], gx, state.h_LxBxH[l], state.c_LxBxH[l], dtype)
    hs.append(h)
    cs.append(c)
    inp = h
  return inp, State(jnp.stack(hs), jnp.stack(cs))
