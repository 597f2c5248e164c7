"""The CPU kernels compute what the plain code does.

- cpu_kernels.fused_layer / softmax_pick (model.kernels=cpu): hand-written backward passes
  against JAX's autodiff of the plain code (float64: to rounding; float32: to 1e-6), padding
  included. The layer tests give every output a cotangent (what a layer above sends back), so
  the model tests use one layer to keep compile time down.
- bfloat16 compute mode: loss and gradients close to float32 (loose tolerance).
- The helpers (transposed, matmul_nt, weight_and_bias_grads, gates, log_softmax, and
  argmax) against the jnp functions they replace, edge cases included.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import cpu_kernels, decode, lstm, model
from s2s_jax.config import ModelConfig
from s2s_jax.data.vocab import EOS_ID

T, B, IN, H = 5, 3, 4, 6
MASK = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 0], [1, 0, 0]], np.float32)  # ragged
CFG = ModelConfig(num_layers=1, hidden_size=8, embed_size=6, init_scale=0.3,
                  kernels="cpu")  # layers: see above


def layer_inputs(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), lstm.init_layer(k[0], IN, H, 0.5))
  x = jax.random.normal(k[1], (T, B, IN), dtype)
  h0 = 0.5 * jax.random.normal(k[2], (B, H), dtype)
  c0 = 0.5 * jax.random.normal(k[3], (B, H), dtype)
  return params, x, h0, c0


@jax.jit(static_argnums=(0, 5))
def layer_vjp(fn, params, x, h0, c0, dtype=None, seed=1):
  """Outputs and the gradients of a random linear function of all outputs."""
  out, pullback = jax.vjp(lambda p, x, h, c: fn(p, x, jnp.asarray(MASK, x.dtype), h, c, dtype),
                          params, x, h0, c0)
  leaves, tree = jax.tree_util.tree_flatten(out)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  cot = tree.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype)
                        for k, leaf in zip(keys, leaves)])
  return out, pullback(cot)


def assert_trees_close(a, b, rtol, atol):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_fused_layer_gradients_equal_autodiff_float64():
  with jax.enable_x64(True):
    args = layer_inputs(jnp.float64)
    out_ref, grads_ref = layer_vjp(lstm.layer, *args)
    out, grads = layer_vjp(cpu_kernels.fused_layer, *args)
    assert_trees_close(out, out_ref, rtol=1e-13, atol=1e-14)  # sigmoid as tanh: to rounding
    assert_trees_close(grads, grads_ref, rtol=1e-11, atol=1e-12)
    assert float(jnp.max(jnp.abs(grads[3]))) > 0.01  # dc0 really flows through the padding


def test_fused_layer_gradients_equal_autodiff_float32():
  args = layer_inputs()
  out_ref, grads_ref = layer_vjp(lstm.layer, *args)
  out, grads = layer_vjp(cpu_kernels.fused_layer, *args)
  assert_trees_close(out, out_ref, rtol=1e-6, atol=1e-6)
  assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


def test_fused_layer_padding_steps_pass_gradients_through():
  """A padded step neither reads its input nor changes the state: zero gradient for x there."""
  args = layer_inputs()
  _, (_, dx, _, _) = layer_vjp(cpu_kernels.fused_layer, *args)
  np.testing.assert_array_equal(np.asarray(dx)[MASK == 0], 0.0)
  assert np.all(np.abs(np.asarray(dx)[MASK == 1]).sum(axis=-1) > 0)


def test_fused_layer_bfloat16_close_to_float32():
  args = layer_inputs()
  _, grads_ref = layer_vjp(lstm.layer, *args)
  _, grads = layer_vjp(cpu_kernels.fused_layer, *args, jnp.bfloat16)
  for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
    assert g.dtype == r.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=0.05, atol=0.03 * float(jnp.max(jnp.abs(r))))


def model_batch():
  src = np.array([[5, 6, 7, 8, 9], [7, 4, 0, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
  tgt = np.array([[4, 5, EOS_ID, 0], [6, 7, 8, EOS_ID], [EOS_ID, 0, 0, 0], [0, 0, 0, 0]], np.int32)
  return {"src": jnp.asarray(src), "tgt": jnp.asarray(tgt)}


def loss_and_grads(cfg, params, batch):
  (loss, _), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)(
      params, batch, cfg)
  return loss, grads


@pytest.fixture(scope="module")
def f32_run():
  """(params, batch, loss, grads) of the float32 model with the CPU kernels, computed once."""
  params = model.init_params(jax.random.PRNGKey(3), CFG, 12, 11)
  batch = model_batch()
  return (params, batch) + loss_and_grads(CFG, params, batch)


def test_model_cpu_kernels_equal_plain_autodiff(f32_run):
  params, batch, loss, grads = f32_run
  loss_ref, grads_ref = loss_and_grads(dataclasses.replace(CFG, kernels="plain"), params, batch)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


def test_softmax_loss_cpu_kernel_equals_autodiff_float64():
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.PRNGKey(4), 4)
    softmax = {"w": jax.random.normal(k[0], (H, 13), jnp.float64),
               "b": jax.random.normal(k[1], (13,), jnp.float64)}
    h = jax.random.normal(k[2], (T, B, H), jnp.float64)
    tgt = jax.random.randint(k[3], (T, B), 0, 13)
    g = jnp.asarray(np.linspace(-1.0, 2.0, T * B).reshape(T, B))  # any cotangent

    @jax.jit(static_argnums=0)
    def grads(kernels, softmax, h):
      cfg = dataclasses.replace(CFG, kernels=kernels)
      f = lambda s, h: jnp.sum(g * model.target_log_probs({"softmax": s}, h, tgt, cfg))
      return jax.value_and_grad(f, argnums=(0, 1))(softmax, h)

    (lp, grads_), (lp_ref, grads_ref) = grads("cpu", softmax, h), grads("plain", softmax, h)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-13)
    assert_trees_close(grads_, grads_ref, rtol=1e-11, atol=1e-12)


def test_bfloat16_loss_and_gradients_close_to_float32(f32_run):
  params, batch, loss32, g32 = f32_run
  loss16, g16 = loss_and_grads(dataclasses.replace(CFG, compute_dtype="bfloat16"), params, batch)
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  for a, r in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)):
    a, r = np.ravel(a), np.ravel(r)
    assert a.dtype == np.float32
    assert np.linalg.norm(a - r) <= 0.05 * np.linalg.norm(r) + 1e-6


@pytest.mark.parametrize("shape", [(12, 5), (7, 3), (1, 4), (30, 1)])
def test_transposed_is_transpose(shape):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  np.testing.assert_array_equal(jax.jit(cpu_kernels.transposed)(x), x.T)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 6, 2), (2, 3, 1, 4)])
def test_transposed_flattens_leading_axes(shape):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  np.testing.assert_array_equal(jax.jit(cpu_kernels.transposed)(x), x.reshape(-1, shape[-1]).T)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_weight_and_bias_grads_are_xt_dy_and_column_sums(dtype):
  kx, ky = jax.random.split(jax.random.PRNGKey(11))
  x_TxBxK = jax.random.normal(kx, (5, 6, 7))
  dy_NxM = jax.random.normal(ky, (30, 9))
  if dtype is not None:
    dy_NxM = dy_NxM.astype(dtype)  # the caller passes dy already in the compute dtype
  dw, db = jax.jit(cpu_kernels.weight_and_bias_grads, static_argnums=2)(x_TxBxK, dy_NxM, dtype)
  assert dw.shape == (7, 9) and db.shape == (9,)
  assert dw.dtype == db.dtype == jnp.float32
  cast = lambda a: np.asarray(a if dtype is None else a.astype(dtype), np.float64)
  x_NxK, dy = cast(x_TxBxK).reshape(30, 7), cast(dy_NxM)
  np.testing.assert_allclose(dw, x_NxK.T @ dy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, dy.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("x_shape", [(7, 33), (3, 5, 33)])
def test_matmul_nt_is_matmul_by_transpose(dtype, x_shape):
  kx, kw = jax.random.split(jax.random.PRNGKey(7))
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, (9, 33))
  got = jax.jit(cpu_kernels.matmul_nt, static_argnums=2)(x, w, dtype)
  assert got.shape == x_shape[:-1] + (9,) and got.dtype == jnp.float32
  # the same operands (rounded to dtype) with a float64 sum: only the summation order differs
  cast = lambda a: np.asarray(a if dtype is None else a.astype(dtype), np.float64)
  np.testing.assert_allclose(got, cast(x) @ cast(w).T, rtol=1e-5, atol=1e-5)


def test_log_softmax_equals_jax():
  x = 5.0 * jax.random.normal(jax.random.PRNGKey(6), (4, 37))
  x = x.at[1, :3].set(-jnp.inf)
  np.testing.assert_allclose(cpu_kernels.log_softmax(x), jax.nn.log_softmax(x, axis=-1),
                             rtol=1e-6, atol=1e-6)


def test_argmax_equals_jnp_argmax():
  x = np.round(np.random.default_rng(0).normal(size=(6, 9)), 1).astype(np.float32)
  x[0] = 1.0  # all tied: first index
  x[1, [2, 7]] = 9.0  # tie between two maxima
  x[2] = -np.inf  # nothing allowed
  x[3, 4] = np.nan  # a NaN counts as the maximum
  x[4, [1, 5]] = np.nan
  got = np.asarray(jax.jit(cpu_kernels.argmax)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
  np.testing.assert_array_equal(got[:5], [0, 2, 0, 4, 1])


def test_gate_activations_match_sigmoid_and_tanh():
  """The one-pass activations (sigmoid as tanh(z/2)/2 + 1/2) against the textbook formulas."""
  h = 8
  z = np.linspace(-40.0, 40.0, 4 * 4 * h * 25, dtype=np.float32).reshape(100, 4 * h)
  gates = jax.jit(cpu_kernels.gates)(jnp.asarray(z))
  z64 = z.astype(np.float64)
  sig = 1.0 / (1.0 + np.exp(-z64))
  want = np.concatenate([sig[:, :2 * h], np.tanh(z64[:, 2 * h:3 * h]), sig[:, 3 * h:]], axis=1)
  np.testing.assert_allclose(gates, want, rtol=0, atol=3e-7)


@pytest.mark.parametrize("backend,kernels,want", [("cpu", "auto", True), ("gpu", "auto", False),
                                                  ("tpu", "auto", False), ("gpu", "cpu", True),
                                                  ("cpu", "plain", False)])
def test_cpu_kernels_only_on_the_cpu_backend_unless_asked(monkeypatch, backend, kernels, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert model.cpu_kernels_on(dataclasses.replace(CFG, kernels=kernels)) is want
  with pytest.raises(ValueError, match="model.kernels"):
    model.cpu_kernels_on(dataclasses.replace(CFG, kernels="fast"))


def test_greedy_and_beam_decoding_equal_under_cpu_and_plain_kernels():
  params = model.init_params(jax.random.PRNGKey(5), CFG, 12, 11)
  src = jnp.asarray(model_batch()["src"][:3])
  outs = {}
  for kernels in ("cpu", "plain"):
    cfg = dataclasses.replace(CFG, kernels=kernels)
    g = decode.greedy(params, src, cfg=cfg, max_len=6)
    b = decode.beam(params, src, cfg=cfg, beam_size=3, max_len=6)
    outs[kernels] = (np.asarray(g[0]), np.asarray(b.tokens_BxNxT))
    assert np.all(np.isfinite(np.asarray(g[1])))
  np.testing.assert_array_equal(outs["cpu"][0], outs["plain"][0])
  np.testing.assert_array_equal(outs["cpu"][1], outs["plain"][1])
