"""A deep LSTM as pure functions over parameter pytrees: the paper's model, in plain JAX.

Shapes: B batch, T time, I layer input size, H hidden size, G = 4H gates, L layers.
Gate order in the fused matrices is (input, forget, cell, output):

  z = x @ w_x + h @ w_h + b
  c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
  h' = sigmoid(o) * tanh(c')

`layer` does the input projection x @ w_x + b for all time steps in one matmul before the
scan; each step (`cell`) then adds h @ w_h and applies the gates. `stack_step` runs all
layers for one time step (decoding). Where mask is 0 (padding) the state is carried through
unchanged, so a padded sentence ends with exactly the state it would have alone.

`dtype` (model.compute_dtype) is the matmul operand dtype: None keeps float32, bfloat16
rounds the operands and accumulates in float32. Faster kernels for XLA's CPU backend, with
hand-written backward passes, are in `cpu_kernels` (chosen by `model`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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


def cell(w_h_HxG: Array, gx_BxG: Array, h_BxH: Array, c_BxH: Array,
         dtype: jnp.dtype | None = None) -> tuple[Array, Array]:
  """One LSTM step given the precomputed input projection gx = x @ w_x + b."""
  z_BxG = gx_BxG + matmul(h_BxH, w_h_HxG, dtype)
  i, f, g, o = jnp.split(z_BxG, 4, axis=-1)
  c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c_BxH), c_BxH


def masked_cell(w_h_HxG: Array, gx_BxG: Array, h_BxH: Array, c_BxH: Array, m_B: Array,
                dtype: jnp.dtype | None = None) -> tuple[Array, Array]:
  """`cell` where m_B is 1; where it is 0 (padding) the state is carried through unchanged."""
  h_new, c_new = cell(w_h_HxG, gx_BxG, h_BxH, c_BxH, dtype)
  keep = m_B[:, None] > 0
  return jnp.where(keep, h_new, h_BxH), jnp.where(keep, c_new, c_BxH)


def layer(params: LayerParams, x_TxBxI: Array, mask_TxB: Array, h0_BxH: Array, c0_BxH: Array,
          dtype: jnp.dtype | None = None) -> tuple[Array, tuple[Array, Array]]:
  """Runs one layer over time. Returns (h for every step TxBxH, final (h, c))."""
  gx_TxBxG = matmul(x_TxBxI, params["w_x"], dtype) + params["b"]

  def step(carry, inputs):
    h_BxH, c_BxH = carry
    gx_BxG, m_B = inputs
    h_BxH, c_BxH = masked_cell(params["w_h"], gx_BxG, h_BxH, c_BxH, m_B, dtype)
    return (h_BxH, c_BxH), h_BxH

  (h_T, c_T), h_TxBxH = jax.lax.scan(step, (h0_BxH, c0_BxH), (gx_TxBxG, mask_TxB))
  return h_TxBxH, (h_T, c_T)


def stack(layers: list[LayerParams], x_TxBxI: Array, mask_TxB: Array, state: State,
          dtype: jnp.dtype | None = None, run_layer: Callable = layer,
          dropout: Callable[[int, Array], Array] | None = None) -> tuple[Array, State]:
  """Runs L layers layer-major over the whole sequence.

  Returns the top layer's h at every step (TxBxH) and the final state of every layer.
  `run_layer`: `layer`, or a function computing the same (cpu_kernels.fused_layer).
  `dropout(l, x)`: applied to the input of layer l (the non-recurrent connections only).
  """
  hs, cs = [], []
  inp = x_TxBxI
  for i, p in enumerate(layers):
    if dropout is not None:
      inp = dropout(i, inp)
    inp, (h, c) = run_layer(p, inp, mask_TxB, state.h_LxBxH[i], state.c_LxBxH[i], dtype)
    hs.append(h)
    cs.append(c)
  return inp, State(jnp.stack(hs), jnp.stack(cs))


def stack_step(layers: list[LayerParams], x_BxI: Array, state: State,
               dtype: jnp.dtype | None = None,
               dropout: Callable[[int, Array], Array] | None = None) -> tuple[Array, State]:
  """One time step through all L layers (for decoding). Returns (top h BxH, new state).
  `dropout`: as in `stack`."""
  hs, cs = [], []
  inp = x_BxI
  for i, p in enumerate(layers):
    if dropout is not None:
      inp = dropout(i, inp)
    gx = matmul(inp, p["w_x"], dtype) + p["b"]
    h, c = cell(p["w_h"], gx, state.h_LxBxH[i], state.c_LxBxH[i], dtype)
    hs.append(h)
    cs.append(c)
    inp = h
  return inp, State(jnp.stack(hs), jnp.stack(cs))
