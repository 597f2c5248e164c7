"""Ensembles: K models with one architecture, decoded and scored together in one program.

The K parameter pytrees are stacked along a new leading axis (`stack`); `jax.vmap` runs the
K encoders and decoders side by side. Every function here also accepts the plain (unstacked)
parameters of a single model, telling the two apart by the rank of `src_embed` (VxE for one
model, KxVxE for a stack), so search and scoring code has one path for both.

Combination rule (ensemble log-probability, "probability averaging"): at every step the
ensemble's distribution is the mean of the K members' distributions,
    log p(y_t | x, y_<t) = log( (1/K) sum_k p_k(y_t | x, y_<t) ),
computed stably as logsumexp_k(log p_k) - log K. It is a proper distribution (sums to 1),
so beam scores and teacher-forced scores of an ensemble are log-probabilities of the same
kind as a single model's, and an ensemble of K copies of one model is that model.

Decoder state: a single model's is `lstm.State` with leaves LxBxH; an ensemble's has leaves
KxLxBxH. In both the sentence (row) axis is -2, which is what the search gathers along.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from s2s_jax import checkpoint, lstm
from s2s_jax import model
from s2s_jax.config import Config, ModelConfig
from s2s_jax.data.vocab import PAD_ID, Vocab

Array = jax.Array
STATE_ROW_AXIS = -2  # the sentence axis of every decoder-state leaf (...xBxH)


def num_members(params: model.Params) -> int:
  """K for stacked ensemble parameters, 0 for a single model's parameters."""
  return params["src_embed"].shape[0] if params["src_embed"].ndim == 3 else 0


def stack(members: Sequence[model.Params]) -> model.Params:
  """K parameter pytrees of identical structure and shapes -> one pytree with a leading K axis."""
  if not members:
    raise ValueError("an ensemble needs at least one model")
  shapes = [jax.tree_util.tree_map(jnp.shape, m) for m in members]
  for i, s in enumerate(shapes[1:], 1):
    if s != shapes[0]:
      raise ValueError(f"ensemble member {i} has parameter shapes different from member 0")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)


def combine(logp_KxBxV: Array) -> Array:
  """The ensemble rule: log of the mean of the K distributions (see the module docstring)."""
  return jax.nn.logsumexp(logp_KxBxV, axis=0) - math.log(logp_KxBxV.shape[0])


def encode(params: model.Params, src_BxS: Array, cfg: ModelConfig) -> lstm.State:
  """Initial decoder state: leaves LxBxH (one model) or KxLxBxH (an ensemble)."""
  if num_members(params):
    return jax.vmap(lambda p: model.encode(p, src_BxS, cfg))(params)
  return model.encode(params, src_BxS, cfg)


def decoder_step(params: model.Params, state: lstm.State, y_prev_B: Array,
                 cfg: ModelConfig) -> tuple[Array, lstm.State]:
  """One step: (combined log p BxV, new state)."""
  if num_members(params):
    step = lambda p, s: model.decoder_step(p, s, y_prev_B, cfg)
    logp_KxBxV, state = jax.vmap(step)(params, state)
    return combine(logp_KxBxV), state
  return model.decoder_step(params, state, y_prev_B, cfg)


def token_log_probs(params: model.Params, batch: dict[str, Array], cfg: ModelConfig) -> Array:
  """Teacher-forced combined log p(y_t | x, y_<t) of every target token, BxT, 0 at padding."""
  if not num_members(params):
    return model.token_log_probs(params, batch, cfg)
  lp_KxBxT = jax.vmap(lambda p: model.token_log_probs(p, batch, cfg))(params)
  return jnp.where(batch["tgt"] != PAD_ID, combine(lp_KxBxT), 0.0)


def eval_step(params: model.Params, batch: dict[str, Array], *,
              cfg: ModelConfig) -> dict[str, Array]:
  """Summed NLL and token count of a batch (the interface of `decode.perplexity`)."""
  lp_BxT = token_log_probs(params, batch, cfg)
  return {"nll_sum": -jnp.sum(lp_BxT), "num_tokens": jnp.sum(batch["tgt"] != PAD_ID)}


def load(workdirs: Sequence[str]) -> tuple[Config, model.Params, Vocab, Vocab, list[int]]:
  """Loads one WORKDIR (plain params) or several (stacked params) for decoding.

  Returns (config of the first, params, source vocab, target vocab, checkpoint steps). All
  members must share both vocabularies, the model architecture and the source order.
  """
  loaded = [checkpoint.load_model(w) for w in workdirs]
  cfg, params0, src_vocab, tgt_vocab, _ = loaded[0]
  for w, (c, _, sv, tv, _) in zip(workdirs[1:], loaded[1:]):
    for name, mine, first in (("source", sv, src_vocab), ("target", tv, tgt_vocab)):
      if mine.tokens != first.tokens:
        raise ValueError(f"ensemble: {os.path.join(w, 'vocab.*.txt')}: the {name} vocabulary "
                         f"differs from {workdirs[0]}'s; all members must share vocabularies")
    arch = lambda m: (m.num_layers, m.hidden_size, m.embed_size)
    if arch(c.model) != arch(cfg.model):
      raise ValueError(f"ensemble: {w} has model {arch(c.model)} (layers, hidden, embed) but "
                       f"{workdirs[0]} has {arch(cfg.model)}; members must share the architecture")
    if c.data.reverse_source != cfg.data.reverse_source or c.data.tokenizer != cfg.data.tokenizer:
      raise ValueError(f"ensemble: {w} differs from {workdirs[0]} in data.reverse_source or "
                       "data.tokenizer; members must read the source the same way")
  steps = [x[4] for x in loaded]
  if len(loaded) == 1:
    return cfg, params0, src_vocab, tgt_vocab, steps
  return cfg, stack([x[1] for x in loaded]), src_vocab, tgt_vocab, steps
