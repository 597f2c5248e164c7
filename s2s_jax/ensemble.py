"""Ensembles: K models decoded and scored together in one program.

Two forms, both one compiled program:
- stacked: members of one architecture (the same model config and parameter shapes) have
  their K parameter pytrees stacked along a new leading axis (`stack`); `jax.vmap` runs the K
  encoders and decoders side by side.
- members: members that differ (attention or not, its type, input feeding, the encoder, the
  sizes) are a tuple of parameter pytrees with a tuple of model configs (the `cfg` argument);
  the step runs them one after the other in a Python loop inside the program.
Every function here also accepts the plain parameters of a single model, telling the forms
apart by type (a tuple: members) and by the rank of `src_embed` (VxE for one model, KxVxE
for a stack), so search and scoring code has one path for all.

Combination rule (ensemble log-probability, "probability averaging"): at every step the
ensemble's distribution is the mean of the K members' distributions,
    log p(y_t | x, y_<t) = log( (1/K) sum_k p_k(y_t | x, y_<t) ),
computed stably as logsumexp_k(log p_k) - log K. It is a proper distribution (sums to 1),
so beam scores and teacher-forced scores of an ensemble are log-probabilities of the same
kind as a single model's, and an ensemble of K copies of one model is that model.

Decoder state: a single model's is `lstm.State` (leaves LxBxH) or `model.AttentionState`; a
stack's has a leading K axis on every leaf; members' is the tuple of theirs. In all of them
the sentence (row) axis is -2, which is what the search gathers along.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from s2s_jax import checkpoint, model
from s2s_jax.config import Config, ModelConfig
from s2s_jax.data.vocab import PAD_ID, Vocab

Array = jax.Array
STATE_ROW_AXIS = -2  # the sentence axis of every decoder-state leaf (...xBxH)


Members = tuple  # the parameters (or model configs) of an ensemble of different members
ModelCfg = ModelConfig | tuple  # one model config, or a tuple of the members'


def num_members(params: model.Params | Members) -> int:
  """K for an ensemble (stacked or members), 0 for a single model's parameters."""
  if isinstance(params, tuple):
    return len(params)
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


def encode(params: model.Params | Members, src_BxS: Array, cfg: ModelCfg) -> Any:
  """Initial decoder state (`model.initial_state`): one model's, a stack's (leading K axis),
  or the tuple of the members'."""
  if isinstance(params, tuple):
    return tuple(model.initial_state(p, src_BxS, c) for p, c in zip(params, cfg))
  if num_members(params):
    return jax.vmap(lambda p: model.initial_state(p, src_BxS, cfg))(params)
  return model.initial_state(params, src_BxS, cfg)


def decoder_step(params: model.Params | Members, state: Any, y_prev_B: Array,
                 cfg: ModelCfg) -> tuple[Array, Any]:
  """One step: (combined log p BxV, new state)."""
  if isinstance(params, tuple):
    outs = [model.decoder_step(p, s, y_prev_B, c) for p, s, c in zip(params, state, cfg)]
    return combine(jnp.stack([lp for lp, _ in outs])), tuple(s for _, s in outs)
  if num_members(params):
    step = lambda p, s: model.decoder_step(p, s, y_prev_B, cfg)
    logp_KxBxV, state = jax.vmap(step)(params, state)
    return combine(logp_KxBxV), state
  return model.decoder_step(params, state, y_prev_B, cfg)


def alignment(state: Any, cfg: ModelCfg) -> Array:
  """The attention weights of the last step, BxS: the mean over the members with attention.
  A ValueError when no member has attention."""
  if isinstance(cfg, tuple):
    weights = [s.align_BxS for s, c in zip(state, cfg) if c.attention != "none"]
    if not weights:
      raise ValueError("attention weights (--align, --replace_unk) need a model with "
                       "model.attention; no ensemble member has it")
    return sum(weights) / len(weights)
  if cfg.attention == "none":
    raise ValueError("attention weights (--align, --replace_unk) need a model trained with "
                     "model.attention; this one has none")
  return state.align_BxS if state.align_BxS.ndim == 2 else jnp.mean(state.align_BxS, axis=0)


def token_log_probs(params: model.Params | Members, batch: dict[str, Array],
                    cfg: ModelCfg) -> Array:
  """Teacher-forced combined log p(y_t | x, y_<t) of every target token, BxT, 0 at padding."""
  if isinstance(params, tuple):
    lp_KxBxT = jnp.stack([model.token_log_probs(p, batch, c) for p, c in zip(params, cfg)])
  elif num_members(params):
    lp_KxBxT = jax.vmap(lambda p: model.token_log_probs(p, batch, cfg))(params)
  else:
    return model.token_log_probs(params, batch, cfg)
  return jnp.where(batch["tgt"] != PAD_ID, combine(lp_KxBxT), 0.0)


def eval_step(params: model.Params | Members, batch: dict[str, Array], *,
              cfg: ModelCfg) -> dict[str, Array]:
  """Summed NLL and token count of a batch (the interface of `decode.perplexity`)."""
  lp_BxT = token_log_probs(params, batch, cfg)
  return {"nll_sum": -jnp.sum(lp_BxT), "num_tokens": jnp.sum(batch["tgt"] != PAD_ID)}


DECODING_FIELDS = ("num_layers", "hidden_size", "embed_size", "attention", "attention_positions",
                   "input_feeding", "encoder")  # what a model computes when decoding


def architecture(cfg: ModelConfig) -> tuple:
  return tuple(getattr(cfg, f) for f in DECODING_FIELDS)


def load(workdirs: Sequence[str]
         ) -> tuple[Config, model.Params | Members, Vocab, Vocab, list[int], ModelCfg]:
  """Loads one WORKDIR (plain params) or several (an ensemble) for decoding.

  Returns (config of the first, params, source vocab, target vocab, checkpoint steps, model
  config(s)). Members of one architecture are stacked (the first's model config); members
  that differ are a tuple, with the tuple of their model configs. All members must share both
  vocabularies and read the source the same way (order, tokenizer).
  """
  loaded = [checkpoint.load_model(w) for w in workdirs]
  cfg, params0, src_vocab, tgt_vocab, _ = loaded[0]
  for w, (c, _, sv, tv, _) in zip(workdirs[1:], loaded[1:]):
    for name, mine, first in (("source", sv, src_vocab), ("target", tv, tgt_vocab)):
      if mine.tokens != first.tokens:
        raise ValueError(f"ensemble: {os.path.join(w, 'vocab.*.txt')}: the {name} vocabulary "
                         f"differs from {workdirs[0]}'s; all members must share vocabularies")
    if c.data.reverse_source != cfg.data.reverse_source or c.data.tokenizer != cfg.data.tokenizer:
      raise ValueError(f"ensemble: {w} differs from {workdirs[0]} in data.reverse_source or "
                       "data.tokenizer; members must read the source the same way")
  steps = [x[4] for x in loaded]
  if len(loaded) == 1:
    return cfg, params0, src_vocab, tgt_vocab, steps, cfg.model
  if len({architecture(x[0].model) for x in loaded}) == 1:
    return cfg, stack([x[1] for x in loaded]), src_vocab, tgt_vocab, steps, cfg.model
  return (cfg, tuple(x[1] for x in loaded), src_vocab, tgt_vocab, steps,
          tuple(x[0].model for x in loaded))
