"""The LSTM stack against plain reference computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import lstm


def reference_cell(p, x, h, c):
  """The textbook LSTM equations, written out gate by gate in numpy."""
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  hsz = h.shape[-1]
  z = x @ np.asarray(p["w_x"]) + h @ np.asarray(p["w_h"]) + np.asarray(p["b"])
  i, f, g, o = (z[:, k * hsz:(k + 1) * hsz] for k in range(4))
  c = sig(f) * c + sig(i) * np.tanh(g)
  return sig(o) * np.tanh(c), c


@pytest.mark.parametrize("num_layers", [1, 4])
def test_scan_stack_equals_python_loop(num_layers):
  b, t, i, h = 3, 7, 5, 6
  layers = lstm.init_stack(jax.random.PRNGKey(num_layers), num_layers, i, h, 0.5)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (t, b, i)))
  mask = np.ones((t, b), np.float32)
  top, state = jax.jit(lstm.stack)(layers, x, mask, lstm.zero_state(num_layers, b, h))

  hs = [np.zeros((b, h)) for _ in range(num_layers)]
  cs = [np.zeros((b, h)) for _ in range(num_layers)]
  tops = []
  for step in range(t):  # time-major python loop over the cell, layer by layer
    inp = x[step]
    for k in range(num_layers):
      hs[k], cs[k] = reference_cell(layers[k], inp, hs[k], cs[k])
      inp = hs[k]
    tops.append(inp)
  np.testing.assert_allclose(top, np.stack(tops), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.h_LxBxH, np.stack(hs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.c_LxBxH, np.stack(cs), rtol=1e-5, atol=1e-5)


def test_stack_step_equals_stack():
  num_layers, b, t, i, h = 2, 2, 4, 3, 5
  layers = lstm.init_stack(jax.random.PRNGKey(1), num_layers, i, h, 0.5)
  x = jax.random.normal(jax.random.PRNGKey(2), (t, b, i))
  top, final = lstm.stack(layers, x, jnp.ones((t, b)), lstm.zero_state(num_layers, b, h))
  state = lstm.zero_state(num_layers, b, h)
  for step in range(t):
    out, state = lstm.stack_step(layers, x[step], state)
    np.testing.assert_allclose(out, top[step], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.c_LxBxH, final.c_LxBxH, rtol=1e-5, atol=1e-6)


def test_masked_steps_carry_state():
  """A sentence padded at the end finishes with exactly its unpadded final state."""
  layers = lstm.init_stack(jax.random.PRNGKey(3), 2, 3, 4, 0.5)
  x = jax.random.normal(jax.random.PRNGKey(4), (6, 1, 3))
  _, alone = lstm.stack(layers, x[:4], jnp.ones((4, 1)), lstm.zero_state(2, 1, 4))
  mask = jnp.array([[1], [1], [1], [1], [0], [0]], jnp.float32)
  _, padded = lstm.stack(layers, x, mask, lstm.zero_state(2, 1, 4))
  np.testing.assert_array_equal(padded.h_LxBxH, alone.h_LxBxH)
  np.testing.assert_array_equal(padded.c_LxBxH, alone.c_LxBxH)


def test_init_range():
  layers = lstm.init_stack(jax.random.PRNGKey(0), 3, 20, 30, 0.08)
  leaves = jax.tree_util.tree_leaves(layers)
  assert all(float(jnp.max(jnp.abs(x))) <= 0.08 for x in leaves)
  assert layers[0]["w_x"].shape == (20, 120) and layers[1]["w_x"].shape == (30, 120)
  assert layers[2]["w_h"].shape == (30, 120) and layers[2]["b"].shape == (120,)
