"""Devices, processes and meshes: the helpers every parallel strategy shares.

A leaf module: it imports no other module of the project. Every process of a multi-host run
holds the same host values (batches, initial parameters); the helpers here turn them into
global arrays of which each process transfers only its own part.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"  # mesh axis (and pmap axis name) over which the batch is split
MODEL = "model"  # mesh axis over which the target vocabulary is split
STAGE = "stage"  # parallel.strategy=layers: the LSTM layer stages, then the softmax stages
Pytree = Any


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def is_main_process() -> bool:
  """True on the process that logs, shows progress and writes metrics (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main_process_first(fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0, then (after a barrier) on the others: for steps that write files
  the other processes then read, such as building the vocabularies in the WORKDIR."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_main_process() else None
  sync("s2s_jax: main process first")
  return result if is_main_process() else fn()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the data axis (replicated over any other axis)."""
  return NamedSharding(mesh, P(DATA))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (the same value on every process) as a global array with `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


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
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put_rows(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape)],
                                                  x.shape)

  return jax.tree_util.tree_map(put_rows, batch)


def is_placed(tree: Pytree) -> bool:
  """Whether every leaf is already a jax.Array (placed on devices), not host data."""
  return all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(tree))


def agree(value: int) -> int:
  """The largest `value` over all processes. A collective: every process calls it at the same
  point of the program (on one process it returns `value`)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def to_host(tree: Pytree) -> Pytree:
  """Global arrays as numpy on every process (gathered across processes when needed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def run_batch_sharded(fn: Callable, mesh: Mesh, params: Pytree, *batch: Pytree,
                      pad_id: int = 0, **kwargs) -> Pytree:
  """`fn(params, *batch, **kwargs)` with the batch split by rows over the mesh's data axis.

  For decoding and scoring: `fn` is a jitted batch function (decode.greedy, decode.beam,
  decode.score, ...). `params` are replicated; every array in `batch` (the same on every
  process) is padded with `pad_id` rows up to a multiple of the data size. The outputs come
  back as numpy; those with the padded rows first are cut to the original rows, others (a
  scalar such as a step count) are returned as they are.
  """
  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  data = mesh.shape[DATA]
  padded = -(-rows // data) * data

  def pad(x):
    x = np.asarray(x)
    fill = np.full((padded - rows,) + x.shape[1:], pad_id, x.dtype)
    return np.concatenate([x, fill]) if padded > rows else x

  params = jax.tree_util.tree_map(lambda x: put(x, replicated(mesh)), params)
  placed = [place_batch(mesh, jax.tree_util.tree_map(pad, b)) for b in batch]
  out = to_host(fn(params, *placed, **kwargs))
  return jax.tree_util.tree_map(lambda x: x[:rows] if np.ndim(x) and len(x) == padded else x, out)
