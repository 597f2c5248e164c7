"""Many devices and many hosts: meshes, shardings, the pmap strategy, multi-host helpers.

Three strategies (parallel.strategy), all training exactly like one device (up to the order
of float sums):

  mesh  jit over a `Mesh` with axes (data, model). The batch is split by rows over `data`
        and parameters are replicated; with parallel.model > 1 the target softmax (w HxV,
        b V, and their optimizer state) is split along the vocabulary over `model`, as the
        paper split its 80k softmax over 4 GPUs. The loss runs per device in a `shard_map`
        (psum of NLL sums and sentence counts over `data`; a distributed log-sum-exp over
        `model`), so activations stay on their device and no device ever holds logits over
        the full vocabulary; the optimizer update runs on the global (sharded) arrays.
  pmap  `jax.pmap` over the data devices: every device gets B/n rows and computes its share
        of the paper's loss, (its NLL sum) / (sentences in the GLOBAL batch); the gradients
        and metrics are psum-ed, so all-padding rows on one device change nothing. The train
        state enters and leaves replicated (in_axes=None), like under `mesh`.
  layers the paper's layout: LSTM layer l on device l, the softmax split over parallel.model
        more devices, the layers run as a wavefront over time; a `data` axis on top when
        there are more devices (s2s_jax/wavefront.py). The parameters are held stacked
        along the layers in memory; `to_checkpoint` / `from_checkpoint` convert.

Multi-host: `initialize` starts `jax.distributed`; every process builds the same global
batch from the same seeded iterator and hands only its own rows to the devices
(`jax.make_array_from_process_local_data`). Checkpoints hold global arrays, so orbax writes
each once and restores them onto any layout (see checkpoint.restore).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s2s_jax import model
from s2s_jax.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from s2s_jax.data.vocab import PAD_ID

DATA = "data"  # mesh axis (and pmap axis name) over which the batch is split
MODEL = "model"  # mesh axis over which the target vocabulary is split
STRATEGIES = ("mesh", "pmap", "layers")
Pytree = Any


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run uses its devices: the strategy and its mesh ((data, model), (data,) for pmap,
  (data, stage) for layers)."""
  strategy: str
  mesh: Mesh
  layers: int = 0  # strategy=layers: LSTM stages (the stage axis: these, then the softmax)

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def model_size(self) -> int:
    """Devices sharing the softmax."""
    if self.strategy == "layers":
      return self.mesh.shape["stage"] - self.layers
    return self.mesh.shape.get(MODEL, 1)


# ----------------------------------------------------------------------------- processes

def wants_distributed(cfg: ParallelConfig, environ: Mapping[str, str] = os.environ) -> bool:
  """parallel.distributed=true, or a coordinator address in the environment."""
  return cfg.distributed or bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(cfg: ParallelConfig, environ: Mapping[str, str] = os.environ) -> bool:
  """Starts `jax.distributed` when asked (see `wants_distributed`); returns whether it runs.

  Must come before anything touches a device. The coordinator address, process count and
  process id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when
  set, otherwise JAX detects them (SLURM, Open MPI, Kubernetes, Cloud TPU pod slices).
  """
  if jax.distributed.is_initialized():
    return True
  if not wants_distributed(cfg, environ):
    return False
  kwargs = {}
  for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if environ.get(var):
      try:
        kwargs[arg] = int(environ[var])
      except ValueError:
        msg = f"environment variable {var}={environ[var]!r} is not an integer"
        raise ConfigError(msg) from None
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = environ["JAX_COORDINATOR_ADDRESS"]
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on the process that logs, shows progress and writes metrics (process 0)."""
  return jax.process_index() == 0


def main_process_first(fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0, then (after a barrier) on the others: for steps that write files
  the other processes then read, such as building the vocabularies in the WORKDIR."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if is_main_process() else None
  multihost_utils.sync_global_devices("s2s_jax: main process first")
  return result if is_main_process() else fn()


# ----------------------------------------------------------------------------- layout

def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def check_batch_size(name: str, batch_size: int, data: int, num_devices: int,
                     model_size: int) -> None:
  """A clear error when a global batch does not split evenly over the data axis."""
  if batch_size % data == 0:
    return
  lower, upper = (batch_size // data) * data, (batch_size // data + 1) * data
  examples = " or ".join(str(x) for x in (lower, upper) if x > 0)
  fits = [d for d in _divisors(batch_size) if d * model_size <= num_devices]
  raise ConfigError(
      f"{name}={batch_size} does not divide by the data-parallel size {data} "
      f"({num_devices} devices, parallel.model={model_size}): use a multiple of {data} "
      f"(e.g. {examples}), or set parallel.data to one of {', '.join(map(str, fits))}")


def make_layout(cfg: ParallelConfig, batch_sizes: Mapping[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None,
                num_layers: int | None = None) -> Layout:
  """The layout for `cfg` on `devices` (default: all), checking that every global batch in
  `batch_sizes` ({"train.batch_size": 128, ...}) divides by the data-parallel size.
  `num_layers` (model.num_layers) is needed by strategy=layers only."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if cfg.strategy not in STRATEGIES:
    raise ConfigError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, "
                      f"got {cfg.strategy!r}")
  if cfg.strategy == "layers":
    from s2s_jax import wavefront
    return wavefront.make_layout(cfg, num_layers, batch_sizes, devices)
  if cfg.model < 1:
    raise ConfigError(f"parallel.model must be >= 1, got {cfg.model}")
  if cfg.strategy == "pmap" and cfg.model != 1:
    raise ConfigError(f"parallel.model={cfg.model} needs parallel.strategy=mesh "
                      "(pmap only splits the batch)")
  if cfg.data == -1:
    if n % cfg.model:
      raise ConfigError(f"parallel.model={cfg.model} does not divide the {n} devices; "
                        f"use one of {', '.join(map(str, _divisors(n)))}")
    data = n // cfg.model
  elif cfg.data >= 1:
    data = cfg.data
  else:
    raise ConfigError(f"parallel.data must be -1 (all devices) or >= 1, got {cfg.data}")
  if data * cfg.model > n:
    raise ConfigError(f"parallel.data x parallel.model = {data} x {cfg.model} devices, "
                      f"but only {n} are available")
  if jax.process_count() > 1 and data * cfg.model != n:
    raise ConfigError(f"a multi-host run must use all {n} devices; parallel.data x parallel.model "
                      f"is {data} x {cfg.model}")
  for name, size in (batch_sizes or {}).items():
    check_batch_size(name, size, data, n, cfg.model)
  used = devices[:data * cfg.model]
  if cfg.strategy == "pmap":
    mesh = Mesh(np.array(used), (DATA,))
  else:
    mesh = jax.make_mesh((data, cfg.model), (DATA, MODEL),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=used)
  return Layout(cfg.strategy, mesh)


# ----------------------------------------------------------------------------- shardings

def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the data axis (replicated over any other axis)."""
  return NamedSharding(mesh, P(DATA))


def _softmax_leaf(path: tuple) -> str | None:
  """'w' or 'b' for leaves at .../softmax/{w,b} (params and optimizer state alike)."""
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  if len(keys) >= 2 and keys[-2] == "softmax" and keys[-1] in ("w", "b"):
    return keys[-1]
  return None


def state_shardings(layout: Layout, state: Pytree) -> Pytree:
  """A NamedSharding per leaf of a train state (or params): replicated, except the softmax
  split along the vocabulary over `model` when model_size > 1 (strategy=layers: see
  wavefront.state_shardings)."""
  if layout.strategy == "layers":
    from s2s_jax import wavefront
    return wavefront.state_shardings(layout, state)
  m = layout.model_size

  def sharding(path, leaf):
    kind = _softmax_leaf(path) if m > 1 else None
    if kind is None or np.ndim(leaf) == 0:
      return replicated(layout.mesh)
    vocab = np.shape(leaf)[-1]
    if vocab % m:
      raise ConfigError(
          f"parallel.model={m} must divide the target vocabulary size {vocab} (the softmax is "
          f"split along it): set parallel.model to one of {', '.join(map(str, _divisors(vocab)))} "
          "or change data.tgt_vocab_size (the vocabulary is that plus 4 specials on a large "
          "corpus)")
    return NamedSharding(layout.mesh, P(None, MODEL) if kind == "w" else P(MODEL))

  return jax.tree_util.tree_map_with_path(sharding, state)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (the same value on every process) as a global array with `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(layout: Layout, state: Pytree) -> Pytree:
  """The train state (or params), canonical as train.init_state makes it, on the layout's
  devices, with `state_shardings` (strategy=layers: first converted to its stacked form)."""
  if layout.strategy == "layers":
    from s2s_jax import wavefront
    return wavefront.place_state(layout, state)
  return jax.tree_util.tree_map(_put, state, state_shardings(layout, state))


def to_checkpoint(layout: Layout, state: Pytree) -> Pytree:
  """A placed state in the canonical form checkpoints hold (the state itself, except under
  strategy=layers)."""
  if layout.strategy == "layers":
    from s2s_jax import wavefront
    return wavefront.canonical_state(layout, state)
  return state


def from_checkpoint(layout: Layout, state: Pytree) -> Pytree:
  """A canonical state restored into `to_checkpoint`'s structure, back in the layout's form."""
  if layout.strategy == "layers":
    return place_state(layout, state)
  return state


def check_optimizer(layout: Layout, cfg: OptimConfig) -> None:
  """A clear error for an optimizer the layout cannot run exactly (strategy=layers only)."""
  if layout.strategy == "layers":
    from s2s_jax import wavefront
    wavefront.check_optimizer(cfg)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
  """The contiguous rows of a global array of `shape` that this process's devices hold."""
  spans = {idx[0].indices(shape[0])[:2]
           for idx in sharding.addressable_devices_indices_map(shape).values()}
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != stop - start:
    raise ValueError(f"this process's rows of a {shape} batch are not contiguous: {sorted(spans)}")
  return slice(start, stop)


def place_batch(mesh: Mesh, batch: Pytree) -> Pytree:
  """A host batch (the same global numpy batch on every process) as global arrays split by
  rows over `data`; each process transfers only its own rows."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape)],
                                                  x.shape)

  return jax.tree_util.tree_map(put, batch)


def host_rows(layout: Layout, batch_size: int) -> slice:
  """The rows of a global batch that this process's devices get (all of them on one host):
  the batch iterators read only those sentences from the corpus."""
  if layout.strategy == "pmap":
    n = layout.data_size
    mine = [i for i, d in enumerate(layout.mesh.devices.flat)
            if d.process_index == jax.process_index()]
    return slice(mine[0] * batch_size // n, (mine[-1] + 1) * batch_size // n)
  return process_rows(batch_sharding(layout.mesh), (batch_size, 1))


def pmap_batch(layout: Layout, batch: Pytree) -> Pytree:
  """A global host batch as this process's per-device batches: (local devices, B/n, ...)."""
  n = layout.data_size

  def split(x):
    x = np.asarray(x)
    return x[host_rows(layout, x.shape[0])].reshape((-1, x.shape[0] // n) + x.shape[1:])

  return jax.tree_util.tree_map(split, batch)


# ----------------------------------------------------------------------------- losses

def vocab_sharded_log_probs(params: model.Params, h_TxBxH: jax.Array, tgt_TxB: jax.Array,
                            cfg: ModelConfig) -> jax.Array:
  """A `pick` for model.loss_fn, run per device inside a shard_map over the `model` axis:
  log p(target) with this device holding only its H x V/m slice of the softmax.

  The log-sum-exp over the vocabulary is a psum of local exp-sums around a pmax-ed shift,
  and the target's logit comes from the one shard that owns its id; no device ever forms
  logits over the full vocabulary.
  """
  logits_TxBxVm = model.project(params, h_TxBxH, cfg)
  vm = logits_TxBxVm.shape[-1]
  shift_TxB = lax.pmax(jnp.max(lax.stop_gradient(logits_TxBxVm), axis=-1), MODEL)
  sum_exp_TxB = lax.psum(jnp.sum(jnp.exp(logits_TxBxVm - shift_TxB[..., None]), axis=-1), MODEL)
  lse_TxB = shift_TxB + jnp.log(sum_exp_TxB)
  local_id_TxB = tgt_TxB - lax.axis_index(MODEL) * vm
  owned_TxB = (local_id_TxB >= 0) & (local_id_TxB < vm)
  picked_TxB = jnp.take_along_axis(logits_TxBxVm, jnp.clip(local_id_TxB, 0, vm - 1)[..., None],
                                   axis=-1)[..., 0]
  target_TxB = lax.psum(jnp.where(owned_TxB, picked_TxB, 0.0), MODEL)
  return target_TxB - lse_TxB


def mesh_loss(layout: Layout) -> Callable:
  """model.loss_fn for the mesh strategy: the loss and (through autodiff) its gradient run per
  device in a shard_map over the whole mesh.

  Each device sees its rows of the batch and its slice of the softmax; the NLL sums, token
  and sentence counts are psum-ed over `data`, so the result is exactly the one-device loss,
  and autodiff sums the parameter gradients over the devices (one all-reduce). Whatever the
  model code does (its custom backward reshapes TxB rows, which GSPMD could only do after
  gathering the activations of the whole batch), activations never leave their device.
  check_vma=False: the LSTM scans start from constant zero states, which the varying-axes
  checker rejects as a carry; without it JAX transposes conservatively (the gradients of
  replicated inputs are psum-ed), which is what the sums need (tests/test_parallel.py checks
  the gradients against one device).
  """
  pick = vocab_sharded_log_probs if layout.model_size > 1 else model.target_log_probs

  def loss(params, batch, cfg: ModelConfig):
    def local(params, batch):
      _, aux = model.loss_fn(params, batch, cfg, pick)
      aux = lax.psum(aux, DATA)
      return aux["nll_sum"] / jnp.maximum(aux["num_sents"], 1), aux

    specs = jax.tree_util.tree_map(lambda s: s.spec, state_shardings(layout, params))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(specs, P(DATA)),
                         out_specs=P(), check_vma=False)(params, batch)

  return loss


def pmap_loss_share(params: model.Params, batch: dict[str, jax.Array],
                    cfg: ModelConfig) -> tuple[jax.Array, dict]:
  """Inside pmap: this device's share of the paper's loss, NLL sum / GLOBAL sentence count.

  The shares (and their gradients) psum to exactly the one-device loss (and gradient),
  however the sentences and all-padding rows are spread over the devices.
  """
  _, aux = model.loss_fn(params, batch, cfg)
  global_sents = lax.psum(aux["num_sents"], DATA)
  return aux["nll_sum"] / jnp.maximum(global_sents, 1), aux


def psum_data(tree: Pytree) -> Pytree:
  return lax.psum(tree, DATA)


def loss_and_reduce(layout: Layout) -> tuple[Callable, Callable | None]:
  """(loss_fn, reduce) for train.train_step under `layout` (reduce None = nothing to add up)."""
  if layout.strategy == "pmap":
    return pmap_loss_share, psum_data
  if layout.strategy == "layers":
    from s2s_jax import wavefront
    return wavefront.loss(layout), None
  return mesh_loss(layout), None


# ----------------------------------------------------------------------------- steps

def compile_steps(layout: Layout, train_step: Callable,
                  eval_step: Callable) -> tuple[Callable, Callable]:
  """Compiles `train_step(state, batch)` (state donated) and `eval_step(params, batch)`, both
  already bound to their config, for `layout`. The results take the state as `place_state`
  returns it and global host batches, and return replicated metrics."""
  if layout.strategy == "pmap":
    devices = list(layout.mesh.devices.flat)
    p_train = jax.pmap(train_step, axis_name=DATA, in_axes=(None, 0), out_axes=None,
                       devices=devices, donate_argnums=0)
    p_eval = jax.pmap(lambda params, batch: psum_data(eval_step(params, batch)), axis_name=DATA,
                      in_axes=(None, 0), out_axes=None, devices=devices)

    def train_fn(state, batch):
      state, metrics = p_train(state, pmap_batch(layout, batch))
      if jax.process_count() > 1:  # pmap returns process-local arrays; checkpoints need global ones
        from jax.experimental import multihost_utils
        state = multihost_utils.host_local_array_to_global_array(state, layout.mesh, P())
      return state, metrics

    return train_fn, lambda params, batch: p_eval(params, pmap_batch(layout, batch))

  def train_keep_layout(state, batch):
    new_state, metrics = train_step(state, batch)
    return lax.with_sharding_constraint(new_state, state_shardings(layout, new_state)), metrics

  j_train = jax.jit(train_keep_layout, donate_argnums=0)
  j_eval = jax.jit(eval_step)
  return (lambda state, batch: j_train(state, place_batch(layout.mesh, batch)),
          lambda params, batch: j_eval(params, place_batch(layout.mesh, batch)))


# ----------------------------------------------------------------------------- decoding

def to_host(tree: Pytree) -> Pytree:
  """Global arrays as numpy on every process (gathered across processes when needed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def run_batch_sharded(fn: Callable, mesh: Mesh, params: Pytree, *batch: Pytree,
                      pad_id: int = PAD_ID, **kwargs) -> Pytree:
  """`fn(params, *batch, **kwargs)` with the batch split by rows over the mesh's data axis.

  For decoding and scoring: `fn` is a jitted batch function (decode.greedy, decode.beam,
  decode.score, ...). `params` are replicated; every array in `batch` (the same on every
  process) is padded with `pad_id` rows up to a multiple of the data size. The outputs come
  back as numpy; those with the padded rows first are cut to the original rows, others (a
  scalar such as a step count) are returned as they are.
  """
  leaves = jax.tree_util.tree_leaves(batch)
  rows = leaves[0].shape[0]
  data = mesh.shape[DATA]
  padded = -(-rows // data) * data

  def pad(x):
    x = np.asarray(x)
    fill = np.full((padded - rows,) + x.shape[1:], pad_id, x.dtype)
    return np.concatenate([x, fill]) if padded > rows else x

  params = jax.tree_util.tree_map(lambda x: _put(x, replicated(mesh)), params)
  placed = [place_batch(mesh, jax.tree_util.tree_map(pad, b)) for b in batch]
  out = to_host(fn(params, *placed, **kwargs))
  return jax.tree_util.tree_map(lambda x: x[:rows] if np.ndim(x) and len(x) == padded else x, out)

