"""parallel.strategy=pmap: `jax.pmap` over the data devices.

Every device gets B/n rows and computes its share of the paper's loss, (its NLL sum) /
(sentences in the GLOBAL batch); the gradients and metrics are psum-ed, so all-padding rows on
one device change nothing. The train state enters and leaves replicated (in_axes=None), as
under the mesh strategy, so checkpoints and placement are the same.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from s2s_jax import model
from s2s_jax.config import ConfigError, ModelConfig, ParallelConfig
from s2s_jax.parallel import base
from s2s_jax.parallel import devices as dev
from s2s_jax.parallel.devices import DATA

Pytree = Any


class PmapStrategy(base.Strategy):
  """jax.pmap over the data devices; see the module doc."""
  name = "pmap"

  @classmethod
  def create(cls, cfg: ParallelConfig, devices: Sequence[jax.Device],
             num_layers: int) -> PmapStrategy:
    if cfg.model != 1:
      raise ConfigError(f"parallel.model={cfg.model} needs parallel.strategy=mesh "
                        "(pmap only splits the batch)")
    data = base.data_replicas(cfg, len(devices), 1, "1", "")
    return cls(Mesh(np.array(devices[:data]), (DATA,)))

  def shardings(self, state: Pytree) -> Pytree:
    return jax.tree_util.tree_map(lambda _: dev.replicated(self.mesh), state)

  def loss(self, params: Pytree, batch: dict[str, jax.Array], cfg: ModelConfig, *,
           rng: jax.Array | None = None, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Inside pmap: this device's share of the paper's loss, NLL sum / GLOBAL sentence count.

    The shares (and their gradients) psum to exactly the one-device loss (and gradient),
    however the sentences and all-padding rows are spread over the devices. The dropout masks
    of a row are those of its global row, as on one device.
    """
    switches = {"label_smoothing": label_smoothing} if label_smoothing else {}
    if rng is not None:
      switches.update(rng=rng, first_row=lax.axis_index(DATA) * batch["tgt"].shape[0])
    _, aux = model.loss_fn(params, batch, cfg, **switches)
    global_sents = lax.psum(aux["num_sents"], DATA)
    return aux.get("loss_sum", aux["nll_sum"]) / jnp.maximum(global_sents, 1), aux

  def reduce(self, tree: Pytree) -> Pytree:
    return lax.psum(tree, DATA)

  def host_rows(self, batch_size: int) -> slice:
    n = self.data_size
    mine = [i for i, d in enumerate(self.mesh.devices.flat)
            if d.process_index == jax.process_index()]
    return slice(mine[0] * batch_size // n, (mine[-1] + 1) * batch_size // n)

  def split_batch(self, batch: Pytree) -> Pytree:
    """A global host batch as this process's per-device batches: (local devices, B/n, ...)."""
    n = self.data_size

    def split(x):
      x = np.asarray(x)
      return x[self.host_rows(x.shape[0])].reshape((-1, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map(split, batch)

  def place_batch(self, batch: Pytree) -> Pytree:
    """This process's per-device batches (`split_batch`) on its devices."""
    if dev.is_placed(batch):
      return batch
    mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    sharding = NamedSharding(Mesh(np.array(mine), (DATA,)), P(DATA))
    return jax.device_put(self.split_batch(batch), sharding)

  def compile(self, train_step: base.StepFn,
              eval_step: base.StepFn) -> tuple[base.StepFn, base.StepFn]:
    devices = list(self.mesh.devices.flat)
    p_train = jax.pmap(train_step, axis_name=DATA, in_axes=(None, 0), out_axes=None,
                       devices=devices, donate_argnums=0)
    p_eval = jax.pmap(lambda params, batch: self.reduce(eval_step(params, batch)),
                      axis_name=DATA, in_axes=(None, 0), out_axes=None, devices=devices)

    def train_fn(state, batch):
      state, metrics = p_train(state, self.place_batch(batch))
      if jax.process_count() > 1:  # pmap returns process-local arrays; checkpoints need global ones
        from jax.experimental import multihost_utils
        state = multihost_utils.host_local_array_to_global_array(state, self.mesh, P())
      return state, metrics

    return train_fn, lambda params, batch: p_eval(params, self.place_batch(batch))
