"""Flax NNX modules over the pure model: `Encoder`, `Decoder` and `Seq2Seq`.

Each module holds `nnx.Param`s and, when called, gathers them into the parameter pytree of
`model.init_params` and runs the same pure functions as the rest of the project
(`model.encode`, `model.decode_hidden`, `model.token_log_probs`, `model.loss_fn`,
`model.decoder_step`), under the module's `ModelConfig` (model.kernels, model.compute_dtype).
So a module computes exactly what the pure functions compute on the same parameters.

State layout (what `nnx.state(Seq2Seq(...))` holds) and the pure pytree entry of each:

  encoder/embed                      src_embed   VsxE
  encoder/layers/<l>/{w_x, w_h, b}   encoder[l]
  decoder/embed                      tgt_embed   VtxE
  decoder/layers/<l>/{w_x, w_h, b}   decoder[l]
  decoder/softmax/{w, b}             softmax

`to_flax` and `from_flax` convert between that state and the pure pytree (a checkpoint of
this project holds the latter); `from_workdir` loads a trained WORKDIR into a `Seq2Seq`.
Initialisation is `model.init_params`: `Seq2Seq(cfg, Vs, Vt, rngs=rngs)` draws one key
`rngs.params()` and holds `model.init_params(key, cfg, Vs, Vt)`; an `Encoder` or `Decoder`
built alone holds the entries of that pytree it owns.

Decoder states are `lstm.State` (leaves LxBxH, rows on axis -2), so `Seq2Seq.encode` and
`Seq2Seq.step` plug into `decode.beam_search` / `decode.greedy_search` as they are.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Self

import jax
import jax.numpy as jnp
from flax import nnx

from s2s_jax import checkpoint, lstm, model
from s2s_jax.config import Config, ModelConfig
from s2s_jax.data.vocab import Vocab

Array = jax.Array
Params = model.Params


def _variables(tree: Any) -> Any:
  """A pure pytree (dicts, lists, arrays) as NNX containers of `nnx.Param`s."""
  if isinstance(tree, Mapping):
    return nnx.Dict({k: _variables(v) for k, v in tree.items()})
  if isinstance(tree, (list, tuple)):
    return nnx.List([_variables(v) for v in tree])
  return nnx.Param(tree)


def _pure(node: Any) -> Any:
  """The pure pytree of an `nnx.State` branch or its pure-dict form: lists come back from the
  integer-keyed mappings that NNX makes of them, `Variable`s become their values."""
  if isinstance(node, nnx.Variable):
    return node.get_value()
  if not isinstance(node, Mapping):
    return node
  if node and all(isinstance(k, int) for k in node):
    return [_pure(node[i]) for i in range(len(node))]
  return {k: _pure(v) for k, v in node.items()}


# model.init_params as one program, compiled once per config and vocabulary sizes.
_init_params = jax.jit(model.init_params, static_argnums=(1, 2, 3))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_entries(key: Array, cfg: ModelConfig, src_vocab: int, tgt_vocab: int,
                  names: tuple[str, ...]) -> Params:
  """The entries `names` of model.init_params(key, ...), in one program (the other entries
  are never drawn)."""
  params = model.init_params(key, cfg, src_vocab, tgt_vocab)
  return {n: params[n] for n in names}


def _check(cfg: ModelConfig, params: Params, names: Iterable[str]) -> None:
  """Raises ValueError naming the first of `params`' entries `names` whose structure or
  shapes are not those `model.init_params` gives under `cfg` (or the config has attention)."""
  if cfg.attention != "none":
    raise ValueError(f"s2s_jax.nn holds the paper's model; model.attention={cfg.attention!r} "
                     "runs through the functions of s2s_jax.model")
  names = list(names)
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params have no {', '.join(missing)} entry")
  vocab = lambda n: params[n].shape[0] if n in names else 1
  like = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg, vocab("src_embed"),
                                                  vocab("tgt_embed")))
  shapes = lambda tree: {jax.tree_util.keystr(path): x.shape for path, x in
                         jax.tree_util.tree_flatten_with_path({n: tree[n] for n in names})[0]}
  want, have = shapes(like), shapes(params)
  for key in sorted(want.keys() | have.keys()):
    if want.get(key) != have.get(key):
      raise ValueError(f"params{key}: {have.get(key, 'absent')}, where the model config "
                       f"(num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
                       f"embed_size={cfg.embed_size}) gives {want.get(key, 'nothing')}")


class _Part(nnx.Module):
  """A module whose `nnx.Param`s are entries of the model's parameter pytree."""

  LAYOUT: dict[str, str] = {}  # pure pytree entry -> attribute of the module
  EMBED = ""  # the entry whose rows are the vocabulary

  def _hold(self, cfg: ModelConfig, params: Params) -> None:
    self.cfg = cfg
    for name, attr in self.LAYOUT.items():
      setattr(self, attr, _variables(params[name]))

  @classmethod
  def from_params(cls, cfg: ModelConfig, params: Params) -> Self:
    """A module holding its entries of `params` (a `model.init_params` pytree, e.g. from a
    checkpoint; other entries are ignored)."""
    _check(cfg, params, cls.LAYOUT)
    module = nnx.eval_shape(lambda: cls(cfg, params[cls.EMBED].shape[0], rngs=nnx.Rngs(0)))
    nnx.update(module, nnx.state(cls._variables(params)))
    return module

  @classmethod
  def _variables(cls, params: Params) -> nnx.Dict:
    """`params`' entries of this module as its attributes would hold them."""
    return nnx.Dict({attr: _variables(params[name]) for name, attr in cls.LAYOUT.items()})

  def as_params(self) -> Params:
    """The module's parameters as entries of the pure pytree (the arrays themselves)."""
    state = nnx.state(self, nnx.Param)
    return {name: _pure(state[attr]) for name, attr in self.LAYOUT.items()}


class Encoder(_Part):
  """The source embeddings and the encoder LSTM: src BxS -> the final state of every layer.

  `src_BxS` is int ids, 0-padded on the right, in the order the encoder reads them (reversed
  when data.reverse_source). Parameters: `model.init_params(rngs.params(), ...)`'s src_embed
  and encoder entries.
  """

  LAYOUT = {"src_embed": "embed", "encoder": "layers"}
  EMBED = "src_embed"

  def __init__(self, cfg: ModelConfig, src_vocab: int, *, rngs: nnx.Rngs):
    self._hold(cfg, _init_entries(rngs.params(), cfg, src_vocab, 1, tuple(self.LAYOUT)))

  def __call__(self, src_BxS: Array) -> lstm.State:
    """`model.encode`: (h, c) after the last source token, each LxBxH."""
    return model.encode(self.as_params(), src_BxS, self.cfg)


class Decoder(_Part):
  """The target embeddings, the decoder LSTM and the softmax, started from an encoder state.

  Parameters: `model.init_params(rngs.params(), ...)`'s tgt_embed, decoder and softmax entries.
  """

  LAYOUT = {"tgt_embed": "embed", "decoder": "layers", "softmax": "softmax"}
  EMBED = "tgt_embed"

  def __init__(self, cfg: ModelConfig, tgt_vocab: int, *, rngs: nnx.Rngs):
    self._hold(cfg, _init_entries(rngs.params(), cfg, 1, tgt_vocab, tuple(self.LAYOUT)))

  def __call__(self, state: lstm.State, tgt_BxT: Array) -> Array:
    """Teacher-forced logits BxTxV: position t reads y_<t behind <s> (`model.decode_hidden`)."""
    p = self.as_params()
    h_TxBxH = model.decode_hidden(p, state, tgt_BxT, self.cfg)
    return jnp.swapaxes(model.project(p, h_TxBxH, self.cfg), 0, 1)

  def step(self, state: lstm.State, y_prev_B: Array) -> tuple[Array, lstm.State]:
    """`model.decoder_step`: (log p(. | state, y_prev) BxV, the next state)."""
    return model.decoder_step(self.as_params(), state, y_prev_B, self.cfg)


class Seq2Seq(nnx.Module):
  """The paper's model: an `Encoder` and a `Decoder` with separate parameters.

  `Seq2Seq(cfg, Vs, Vt, rngs=rngs)` holds `model.init_params(rngs.params(), cfg, Vs, Vt)`.
  """

  def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int, *, rngs: nnx.Rngs):
    params = _init_params(rngs.params(), cfg, src_vocab, tgt_vocab)
    self.cfg = cfg
    self.encoder = Encoder.from_params(cfg, params)
    self.decoder = Decoder.from_params(cfg, params)

  @classmethod
  def from_params(cls, cfg: ModelConfig, params: Params) -> Seq2Seq:
    """A module holding `params` (a `model.init_params` pytree, e.g. from a checkpoint)."""
    _check(cfg, params, NAMES)
    vs, vt = params["src_embed"].shape[0], params["tgt_embed"].shape[0]
    module = nnx.eval_shape(lambda: cls(cfg, vs, vt, rngs=nnx.Rngs(0)))
    nnx.update(module, to_flax(params))
    return module

  def as_params(self) -> Params:
    """The parameters as the pure pytree of `model.init_params`."""
    return {**self.encoder.as_params(), **self.decoder.as_params()}

  def __call__(self, src_BxS: Array, tgt_BxT: Array) -> Array:
    """`model.token_log_probs`: log p(y_t | x, y_<t) of every target token, BxT, 0 at padding."""
    return model.token_log_probs(self.as_params(), {"src": src_BxS, "tgt": tgt_BxT}, self.cfg)

  def loss(self, src_BxS: Array, tgt_BxT: Array) -> tuple[Array, dict]:
    """`model.loss_fn`: (summed token NLL / sentences, {nll_sum, num_tokens, num_sents})."""
    return model.loss_fn(self.as_params(), {"src": src_BxS, "tgt": tgt_BxT}, self.cfg)

  def encode(self, src_BxS: Array) -> lstm.State:
    """The decoder's initial state: the encoder's final (h, c), each LxBxH."""
    return self.encoder(src_BxS)

  def step(self, state: lstm.State, y_prev_R: Array) -> tuple[Array, lstm.State]:
    """One decoding step, a `decode.StepFn`: (log p RxV, the next state)."""
    return self.decoder.step(state, y_prev_R)


PARTS = {"encoder": Encoder, "decoder": Decoder}  # a Seq2Seq's submodules by attribute
NAMES = tuple(name for part in PARTS.values() for name in part.LAYOUT)  # all pure entries


def to_flax(params: Params) -> nnx.State:
  """The `nnx.State` of a `Seq2Seq` holding `params` (its "encoder" / "decoder" branches are
  an `Encoder`'s / `Decoder`'s); load it with `nnx.update(module, state)`."""
  return nnx.state(nnx.Dict({part: cls._variables(params) for part, cls in PARTS.items()}))


def from_flax(state: Any) -> Params:
  """The pure pytree of a `Seq2Seq`'s parameter state (`nnx.State` or its pure dict)."""
  missing = [f"{part}/{attr}" for part, cls in PARTS.items() for attr in cls.LAYOUT.values()
             if part not in state or attr not in state[part]]
  if missing:
    raise ValueError(f"not the state of a Seq2Seq: no {', '.join(missing)}")
  return {name: _pure(state[part][attr])
          for part, cls in PARTS.items() for name, attr in cls.LAYOUT.items()}


def from_workdir(workdir: str, step: int | None = None
                 ) -> tuple[Seq2Seq, Config, Vocab, Vocab, int]:
  """A trained WORKDIR as (Seq2Seq, config, source vocab, target vocab, step): the newest
  usable checkpoint (or `step`), verified, as `checkpoint.load_model` reads it."""
  cfg, params, src_vocab, tgt_vocab, step = checkpoint.load_model(workdir, step)
  return Seq2Seq.from_params(cfg.model, params), cfg, src_vocab, tgt_vocab, step
