"""parallel.strategy=layers, the paper's layout: one LSTM layer per device, the softmax over
more devices, the layers run as a wavefront over time.

Devices. The mesh has axes (data, stage) of sizes D x (L + M), L = model.num_layers and
M = parallel.model. Along `stage`, position l < L is LSTM layer l (its encoder AND its decoder
layer: the paper's "decoder layer l starts from encoder layer l's final state" then needs no
transfer), and position L + j holds slice j of the target softmax (H x V/M of w, V/M of b). On
8 devices with L = M = 4 that is the paper's 4 + 4 layout; with more devices every `data`
replica is such a group, the batch rows are split over `data` and the gradients summed over it.

What runs where, per step, inside one `jax.shard_map` over the mesh:
  * every device: a `lax.scan` over K = S + T + L + M - 1 ticks. At tick k the device at stage
    p works on global time step tau = k - p of the concatenated sequence (the S source steps,
    then the T target steps), or idles when tau is outside it.
  * stage l < L: one LSTM step of layer l (encoder weights while tau < S, decoder weights
    after, the (h, c) state carried through), reading the embedded word (l = 0) or what stage
    l - 1 sent it the tick before. Layer l works on step t while layer l + 1 works on t - 1.
  * stage L + j: for target steps, h_top @ w_j + b_j (B x V/M logits), their log-sum-exp and
    the target's logit when slice j owns the target id.
  * after each tick every stage sends its output h to stage p + 1 (`lax.ppermute`, one
    device-to-device transfer of B x H): layer to layer, the top layer to the first softmax
    stage, and softmax stage to softmax stage, so all M slices see every top-layer h.
  * after the scan: the M partial log-sum-exps are combined (an all-gather of T x B values)
    and the target logits psum-ed; each device then holds the loss, psum-ed over `data`.
The backward pass is autodiff of that program: the same wavefront in reverse, the transfers
reversed. Each tick is a `lax.switch` (idle | encoder | decoder | softmax), so a device only
computes its own branch; the tick is rematerialised except its products
(`dots_with_no_batch_dims_saveable`), which keeps the weights out of the per-tick residuals.

Outside the shard_map, at the jit level: the embedding lookups (the tables are replicated;
rows are looked up per data shard) and the optimizer update on the placed arrays.

Parameters in memory (only under this strategy; checkpoints stay canonical, see
`to_canonical` / `from_canonical`, which convert every params-structured subtree of a train
state, the optimizer's included): encoder/decoder become {w_x: [L+M, I, G], w_h: [L+M, H, G],
b: [L+M, G]} with I = max(E, H) (layer 0's w_x padded with zero rows when E < H, the others
when E > H), softmax becomes {w: [L+M, H, V/M], b: [L+M, V/M]}; slots that a stage does not
use are zeros. All are sharded P("stage"): layer l's arrays live on stage l only. Zero slots
get exactly zero gradients, so they stay zero under the elementwise optimizers allowed here
(`ELEMENTWISE_OPTIMIZERS`); optimizers that look at whole arrays (adafactor, lamb, ...) would
see the stacked arrays and are refused.

Limits: the pipeline fills and drains once per batch (forward and backward): of the K ticks
an LSTM stage works S + T and a softmax stage T (it idles through the source steps). The
softmax works one step at a time (B x H @ H x V/M per tick) concurrently with the layers.
The embedding tables are replicated, and every device also holds the zero slot of the other
kind (memory, no compute). model.kernels is not used (plain autodiff). Measured against data
parallelism in benchmarks/layers.py.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from s2s_jax import lstm, model
from s2s_jax.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from s2s_jax.data.vocab import PAD_ID
from s2s_jax.parallel import base
from s2s_jax.parallel import devices as dev
from s2s_jax.parallel.devices import DATA, STAGE

STAGED = ("encoder", "decoder", "softmax")  # the params sharded over STAGE
# optax optimizers whose update of an element depends only on that element's history: they
# update the stacked (and zero-padded) arrays exactly as the canonical per-layer ones.
ELEMENTWISE_OPTIMIZERS = ("sgd", "adam", "adamw", "adamax", "adamaxw", "nadam", "nadamw",
                          "amsgrad", "radam", "rmsprop", "adagrad", "adadelta", "adabelief",
                          "lion", "yogi")
Pytree = Any
Array = jax.Array


# ----------------------------------------------------------------------------- conversion

def _is_params(x: Any) -> bool:
  return isinstance(x, dict) and all(k in x for k in STAGED)


def _map_params(fn: Callable[[dict], dict], tree: Pytree) -> Pytree:
  """`fn` applied to every params-structured subtree of `tree` (the params, the optimizer's
  copies of them); other leaves as they are."""
  return jax.tree_util.tree_map(lambda x: fn(x) if _is_params(x) else x, tree,
                                is_leaf=_is_params)


def _pad_rows(w_KxG: Array, rows: int) -> Array:
  return jnp.pad(w_KxG, ((0, rows - w_KxG.shape[0]), (0, 0)))


def params_from_canonical(params: dict, num_stages: int) -> dict:
  """Canonical params (lists of layers, one softmax) -> the stacked form of the module doc."""
  layers = len(params["encoder"])
  m = num_stages - layers
  w_h = params["encoder"][0]["w_h"]
  h, g = w_h.shape
  i = max(params["encoder"][0]["w_x"].shape[0], h)
  zeros = lambda *shape: jnp.zeros((m,) + shape, w_h.dtype)

  def stack(stack_params):
    return {"w_x": jnp.concatenate([jnp.stack([_pad_rows(p["w_x"], i) for p in stack_params]),
                                    zeros(i, g)]),
            "w_h": jnp.concatenate([jnp.stack([p["w_h"] for p in stack_params]), zeros(h, g)]),
            "b": jnp.concatenate([jnp.stack([p["b"] for p in stack_params]), zeros(g)])}

  w_HxV, b_V = params["softmax"]["w"], params["softmax"]["b"]
  vm = w_HxV.shape[1] // m
  w_MxHxVm = jnp.transpose(w_HxV.reshape(h, m, vm), (1, 0, 2))
  softmax = {"w": jnp.concatenate([jnp.zeros((layers, h, vm), w_HxV.dtype), w_MxHxVm]),
             "b": jnp.concatenate([jnp.zeros((layers, vm), b_V.dtype), b_V.reshape(m, vm)])}
  return dict(params, encoder=stack(params["encoder"]), decoder=stack(params["decoder"]),
              softmax=softmax)


def params_to_canonical(stacked: dict, num_layers: int) -> dict:
  """The inverse of `params_from_canonical`."""
  e = stacked["src_embed"].shape[1]
  h = stacked["encoder"]["w_h"].shape[1]

  def unstack(s):
    return [{"w_x": s["w_x"][i, :e if i == 0 else h], "w_h": s["w_h"][i], "b": s["b"][i]}
            for i in range(num_layers)]

  w_MxHxVm = stacked["softmax"]["w"][num_layers:]
  m, _, vm = w_MxHxVm.shape
  softmax = {"w": jnp.transpose(w_MxHxVm, (1, 0, 2)).reshape(h, m * vm),
             "b": stacked["softmax"]["b"][num_layers:].reshape(m * vm)}
  return dict(stacked, encoder=unstack(stacked["encoder"]), decoder=unstack(stacked["decoder"]),
              softmax=softmax)


def from_canonical(tree: Pytree, num_stages: int) -> Pytree:
  """Every params-structured subtree of a train state (or params) in the stacked form."""
  return _map_params(lambda p: params_from_canonical(p, num_stages), tree)


def to_canonical(tree: Pytree, num_layers: int) -> Pytree:
  """Every params-structured subtree back in the canonical form (what checkpoints hold)."""
  return _map_params(lambda p: params_to_canonical(p, num_layers), tree)


# ----------------------------------------------------------------------------- the program

IDLE, ENCODER, DECODER, SOFTMAX = range(4)  # the branches of a tick


def _stage_program(stages: dict, x_NxBxI: Array, mask_NxB: Array, tgt_TxB: Array, *,
                   layers: int, src_len: int, dtype: jnp.dtype | None) -> Array:
  """Per device (inside the shard_map): log p(target) at every target step, TxB, the same on
  every stage (see the module doc)."""
  n, b, i = x_NxBxI.shape
  t, s = tgt_TxB.shape[0], src_len
  num_stages = lax.axis_size(STAGE)
  k = n + num_stages - 1
  p = lax.axis_index(STAGE)
  enc, dec = ({kk: v[0] for kk, v in stages[name].items()} for name in ("encoder", "decoder"))
  w_HxVm, b_Vm = stages["softmax"]["w"][0], stages["softmax"]["b"][0]
  h_size, vm = w_HxVm.shape

  # This stage's inputs, aligned to ticks: tick k is time step tau = k - p.
  def shifted(a_NxB):
    pad = jnp.zeros((num_stages - 1,) + a_NxB.shape[1:], a_NxB.dtype)
    return lax.dynamic_slice_in_dim(jnp.concatenate([pad, a_NxB, pad]), num_stages - 1 - p, k)

  mask_KxB = shifted(mask_NxB)
  tgt_KxB = shifted(jnp.concatenate([jnp.zeros((s, b), tgt_TxB.dtype), tgt_TxB]))
  tau_K = jnp.arange(k) - p
  inside_K = (tau_K >= 0) & (tau_K < n)
  lstm_K = jnp.where(tau_K < s, ENCODER, DECODER)
  branch_K = jnp.where(p < layers, jnp.where(inside_K, lstm_K, IDLE),
                       jnp.where(inside_K & (tau_K >= s), SOFTMAX, IDLE))
  x_KxBxI = jnp.concatenate([x_NxBxI, jnp.zeros((num_stages - 1, b, i), x_NxBxI.dtype)])
  first_id = (p - layers) * vm  # the first target id of this stage's softmax slice

  def idle(h, c, x_in, inbox, m, y):
    zero_B = jnp.zeros((b,), jnp.float32)
    return h, c, jnp.zeros_like(inbox), zero_B, zero_B

  def lstm_branch(weights):
    def run(h, c, x_in, inbox, m, y):
      gx_BxG = lstm.matmul(x_in, weights["w_x"], dtype) + weights["b"]
      h, c = lstm.masked_cell(weights["w_h"], gx_BxG, h, c, m, dtype)
      zero_B = jnp.zeros((b,), jnp.float32)
      return h, c, h, zero_B, zero_B
    return run

  def softmax(h, c, x_in, inbox, m, y):
    logits_BxVm = lstm.matmul(inbox, w_HxVm, dtype) + b_Vm
    lse_B = jax.nn.logsumexp(logits_BxVm, axis=-1)
    local_B = y - first_id
    owned_B = (local_B >= 0) & (local_B < vm)
    picked_B = jnp.take_along_axis(logits_BxVm, jnp.clip(local_B, 0, vm - 1)[:, None], axis=-1)
    return h, c, inbox, lse_B, jnp.where(owned_B, picked_B[:, 0], 0.0)

  branches = [idle, lstm_branch(enc), lstm_branch(dec), softmax]

  @functools.partial(jax.checkpoint,
                     policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  def work(branch, h, c, x_in, inbox, m, y):
    return lax.switch(branch, branches, h, c, x_in, inbox, m, y)

  shift = [(q, q + 1) for q in range(num_stages - 1)]

  def tick(carry, inputs):
    h, c, inbox = carry
    x_k, m_k, y_k, branch = inputs
    inbox_in = jnp.pad(inbox, ((0, 0), (0, i - h_size)))
    x_in = jnp.where(p == 0, x_k, inbox_in)
    h, c, out, lse_B, picked_B = work(branch, h, c, x_in, inbox, m_k, y_k)
    return (h, c, lax.ppermute(out, STAGE, shift)), (lse_B, picked_B)

  zero_BxH = jnp.zeros((b, h_size), jnp.float32)
  _, (lse_KxB, picked_KxB) = lax.scan(tick, (zero_BxH, zero_BxH, zero_BxH),
                                      (x_KxBxI, mask_KxB, tgt_KxB, branch_K))
  # Softmax stage p saw target step t at tick s + t + p.
  is_softmax = p >= layers
  lse_TxB = jnp.where(is_softmax, lax.dynamic_slice_in_dim(lse_KxB, s + p, t), -jnp.inf)
  picked_TxB = jnp.where(is_softmax, lax.dynamic_slice_in_dim(picked_KxB, s + p, t), 0.0)
  lse_TxB = jax.nn.logsumexp(lax.all_gather(lse_TxB, STAGE), axis=0)
  return lax.psum(picked_TxB, STAGE) - lse_TxB




class LayersStrategy(base.Strategy):
  """One LSTM layer per device, the softmax over more devices; see the module doc."""
  name = "layers"

  def __init__(self, mesh, layers: int):
    super().__init__(mesh)
    self.layers = layers  # the LSTM stages; the stage axis holds these, then the softmax

  @classmethod
  def create(cls, cfg: ParallelConfig, devices: Sequence[jax.Device],
             num_layers: int) -> LayersStrategy:
    if num_layers < 1:
      raise ConfigError(f"model.num_layers must be >= 1, got {num_layers}")
    m = cfg.model
    if m < 1:
      raise ConfigError(f"parallel.model must be >= 1 (softmax devices under "
                        f"parallel.strategy=layers), got {m}")
    n, group = len(devices), num_layers + m
    fits = [str(k - num_layers) for k in dev.divisors(n) if k > num_layers]
    data = base.data_replicas(
        cfg, n, group, f"model.num_layers + parallel.model = {num_layers} + {m} = {group}",
        f"set parallel.model to one of {', '.join(fits) or 'none'}")
    mesh = jax.make_mesh((data, group), (DATA, STAGE),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[:data * group])
    return cls(mesh, num_layers)

  @property
  def model_size(self) -> int:
    return self.mesh.shape[STAGE] - self.layers

  def check_optimizer(self, cfg: OptimConfig) -> None:
    """Only optimizers that update the stacked arrays like the canonical ones (module doc)."""
    if cfg.name not in ELEMENTWISE_OPTIMIZERS:
      raise ConfigError(
          f"optim.name={cfg.name!r} does not work with parallel.strategy=layers (the layers are "
          "stacked into one array per device group, and only optimizers that update every "
          f"element on its own give the same steps): use one of "
          f"{', '.join(ELEMENTWISE_OPTIMIZERS)}, or parallel.strategy=mesh")

  def check_model(self, cfg: ModelConfig, optim: OptimConfig) -> None:
    """The wavefront runs the paper's model only: every switch beyond it is refused."""
    on = [name for name, value in (("model.attention", cfg.attention != "none"),
                                   ("model.input_feeding", cfg.input_feeding),
                                   ("model.encoder", cfg.encoder != "uni"),
                                   ("model.dropout", cfg.dropout > 0),
                                   ("optim.label_smoothing", optim.label_smoothing > 0)) if value]
    if on:
      raise ConfigError(f"parallel.strategy=layers runs the paper's model only, without "
                        f"{', '.join(on)}: use parallel.strategy=mesh or pmap for them")

  def shardings(self, state: Pytree) -> Pytree:
    """Encoder, decoder and softmax leaves of a stacked state split over the stage axis,
    everything else (embeddings, counters) replicated."""
    def sharding(path, leaf):
      keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
      staged = np.ndim(leaf) > 0 and any(k in STAGED for k in keys)
      return NamedSharding(self.mesh, P(STAGE) if staged else P())

    return jax.tree_util.tree_map_with_path(sharding, state)

  def _check_params(self, params: dict) -> None:
    layers, m = self.layers, self.model_size
    if len(params["encoder"]) != layers:
      raise ConfigError(f"the layout has {layers} layer stages, but the model has "
                        f"{len(params['encoder'])} layers (model.num_layers)")
    vocab = np.shape(params["softmax"]["b"])[0]
    if vocab % m:
      fits = [str(d) for d in dev.divisors(vocab) if d + layers <= jax.device_count()]
      raise ConfigError(
          f"parallel.model={m} must divide the target vocabulary size {vocab} (the softmax is "
          f"split along it under parallel.strategy=layers): use one of {', '.join(fits)} or "
          "change data.tgt_vocab_size")

  def place(self, state: Pytree) -> Pytree:
    """A canonical train state (or params) in the stacked form, on the devices."""
    params = [x for x in jax.tree_util.tree_leaves(state, is_leaf=_is_params) if _is_params(x)]
    for p in params:
      if not isinstance(p["encoder"], (list, tuple)):
        raise ValueError("place takes a canonical state (lists of layers); this one is "
                         "already stacked")
      self._check_params(p)
    replicated = dev.replicated(self.mesh)
    state = jax.tree_util.tree_map(lambda x: dev.put(x, replicated), state)
    convert = functools.partial(from_canonical, num_stages=self.mesh.shape[STAGE])
    shardings = self.shardings(jax.eval_shape(convert, state))
    return jax.jit(convert, out_shardings=shardings)(state)

  def to_canonical(self, state: Pytree) -> Pytree:
    """A stacked train state (or params) in the canonical form, replicated over the mesh."""
    convert = functools.partial(to_canonical, num_layers=self.layers)
    return jax.jit(convert, out_shardings=dev.replicated(self.mesh))(state)

  def from_canonical(self, state: Pytree) -> Pytree:
    return self.place(state)

  def loss(self, params: Pytree, batch: dict[str, Array], cfg: ModelConfig, *,
           rng: Array | None = None, label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """model.loss_fn's contract for stacked params: the wavefront program in a shard_map
    (the paper's model only, see `check_model`: `rng` and `label_smoothing` stay unused)."""
    if cfg.num_layers != self.layers:
      raise ValueError(f"model.num_layers={cfg.num_layers}, but the layout has "
                       f"{self.layers} layer stages")
    src_BxS, tgt_BxT = batch["src"], batch["tgt"]
    s = src_BxS.shape[1]
    i = params["encoder"]["w_x"].shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, i - x.shape[-1])))
    x_NxBxI = jnp.concatenate([
        pad(model.embed(params["src_embed"], src_BxS.T)),
        pad(model.embed(params["tgt_embed"], model.decoder_inputs(tgt_BxT).T))])
    mask_NxB = jnp.concatenate([src_BxS.T != PAD_ID, tgt_BxT.T != PAD_ID]).astype(jnp.float32)
    stages = {name: params[name] for name in STAGED}

    def local(stages, x_NxBxI, mask_NxB, tgt_TxB):
      lp_TxB = _stage_program(stages, x_NxBxI, mask_NxB, tgt_TxB, layers=self.layers,
                              src_len=s, dtype=model.compute_dtype(cfg))
      aux = {"nll_sum": -jnp.sum(jnp.where(tgt_TxB != PAD_ID, lp_TxB, 0.0)),
             "num_tokens": jnp.sum(tgt_TxB != PAD_ID),
             "num_sents": jnp.sum(jnp.any(tgt_TxB != PAD_ID, axis=0))}
      aux = lax.psum(aux, DATA)
      return aux["nll_sum"] / jnp.maximum(aux["num_sents"], 1), aux

    # check_vma=False: as in MeshStrategy.loss (zero-state carries; replicated inputs'
    # gradients psum-ed, which is what the sums need).
    specs = jax.tree_util.tree_map(lambda _: P(STAGE), stages)
    return jax.shard_map(local, mesh=self.mesh,
                         in_specs=(specs, P(None, DATA), P(None, DATA), P(None, DATA)),
                         out_specs=P(), check_vma=False)(stages, x_NxBxI, mask_NxB, tgt_BxT.T)
