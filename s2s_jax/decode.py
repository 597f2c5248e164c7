"""Search: greedy decoding as one jitted program (a lax.while_loop on device)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from s2s_jax import model
from s2s_jax.config import ModelConfig
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID

Array = jax.Array


def max_output_length(src_len_B: Array, a: float, b: int) -> Array:
  """Per-sentence cap on output length (</s> included): a * source length + b."""
  return jnp.floor(a * src_len_B).astype(jnp.int32) + b


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "len_a", "len_b"))
def greedy(params: model.Params, src_BxS: Array, *, cfg: ModelConfig, max_len: int,
           len_a: float = 1.5, len_b: int = 10) -> tuple[Array, Array]:
  """Arg-max decoding. Returns (tokens BxT ending in </s> or cut at the cap, log p BxT-summed B).

  A sentence stops at its own cap min(max_len, a*|x|+b), so its output never depends on
  the other sentences of the batch.
  """
  b = src_BxS.shape[0]
  state = model.encode(params, src_BxS, cfg)
  cap_B = jnp.minimum(max_output_length(jnp.sum(src_BxS != PAD_ID, axis=1), len_a, len_b), max_len)
  tokens = jnp.full((b, max_len), PAD_ID, jnp.int32)
  init = (jnp.int32(0), state, jnp.full((b,), BOS_ID, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), jnp.float32), tokens)

  def cond(carry):
    t, _, _, done, _, _ = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, state, y_prev, done, score, tokens = carry
    logp_BxV, state = model.decoder_step(params, state, y_prev, cfg)
    y = jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
    y = jnp.where(t + 1 >= cap_B, EOS_ID, y)  # the cap forces </s>
    lp = jnp.take_along_axis(logp_BxV, y[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, lp)
    y = jnp.where(done, PAD_ID, y)
    tokens = tokens.at[:, t].set(y)
    return t + 1, state, y, done | (y == EOS_ID), score, tokens

  _, _, _, _, score, tokens = jax.lax.while_loop(cond, body, init)
  return tokens, score
