"""parallel.strategy=mesh (the default): jit over a (data, model) mesh.

The batch is split by rows over `data` and the parameters are replicated; with
parallel.model > 1 the target softmax (w HxV, b V, and their optimizer state) is split along
the vocabulary over `model`, as the paper split its 80k softmax over 4 GPUs. The loss runs per
device in a `shard_map` (psum of NLL sums and sentence counts over `data`; a distributed
log-sum-exp over `model`), so activations stay on their device and no device ever holds logits
over the full vocabulary; the optimizer update runs on the global (sharded) arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from s2s_jax import model
from s2s_jax.config import ConfigError, ModelConfig, ParallelConfig
from s2s_jax.parallel import base
from s2s_jax.parallel import devices as dev
from s2s_jax.parallel.devices import DATA, MODEL

Pytree = Any


def softmax_leaf(path: tuple) -> str | None:
  """'w' or 'b' for leaves at .../softmax/{w,b} (params and optimizer state alike)."""
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  if len(keys) >= 2 and keys[-2] == "softmax" and keys[-1] in ("w", "b"):
    return keys[-1]
  return None


def vocab_sharded_log_probs(params: model.Params, h_TxBxH: jax.Array, tgt_TxB: jax.Array,
                            cfg: ModelConfig, label_smoothing: float = 0.0
                            ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """A `pick` for model.loss_fn, run per device inside a shard_map over the `model` axis:
  log p(target) with this device holding only its H x V/m slice of the softmax.

  The log-sum-exp over the vocabulary is a psum of local exp-sums around a pmax-ed shift,
  and the target's logit comes from the one shard that owns its id; no device ever forms
  logits over the full vocabulary. With `label_smoothing` e > 0, also the token losses of
  model.target_log_probs, -(1 - e) log p(target) - e * mean_v log p(v), the mean from a psum
  of the local logit sums.
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
  if not label_smoothing:
    return target_TxB - lse_TxB
  mean_logit_TxB = lax.psum(jnp.sum(logits_TxBxVm, axis=-1), MODEL) / (vm * lax.axis_size(MODEL))
  lp_TxB = target_TxB - lse_TxB
  return lp_TxB, -(1.0 - label_smoothing) * lp_TxB - label_smoothing * (mean_logit_TxB - lse_TxB)


class MeshStrategy(base.Strategy):
  """jit over a (data, model) mesh; see the module doc."""
  name = "mesh"

  @classmethod
  def create(cls, cfg: ParallelConfig, devices: Sequence[jax.Device],
             num_layers: int) -> MeshStrategy:
    data = cls.data_replicas(cfg, len(devices))
    mesh = jax.make_mesh((data, cfg.model), (DATA, MODEL),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[:data * cfg.model])
    return cls(mesh)

  @classmethod
  def data_replicas(cls, cfg: ParallelConfig, num_devices: int) -> int:
    if cfg.model < 1:
      raise ConfigError(f"parallel.model must be >= 1, got {cfg.model}")
    fits = ", ".join(map(str, dev.divisors(num_devices)))
    return base.data_replicas(cfg, num_devices, cfg.model, f"parallel.model={cfg.model}",
                              f"set parallel.model to one of {fits}")

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  def shardings(self, state: Pytree) -> Pytree:
    """Replicated, except the softmax split along the vocabulary over `model` when
    model_size > 1."""
    m = self.model_size

    def sharding(path, leaf):
      kind = softmax_leaf(path) if m > 1 else None
      if kind is None or np.ndim(leaf) == 0:
        return dev.replicated(self.mesh)
      vocab = np.shape(leaf)[-1]
      if vocab % m:
        fits = ", ".join(map(str, dev.divisors(vocab)))
        raise ConfigError(
            f"parallel.model={m} must divide the target vocabulary size {vocab} (the softmax is "
            f"split along it): set parallel.model to one of {fits} or change "
            "data.tgt_vocab_size (the vocabulary is that plus 4 specials on a large corpus)")
      return NamedSharding(self.mesh, P(None, MODEL) if kind == "w" else P(MODEL))

    return jax.tree_util.tree_map_with_path(sharding, state)

  def loss(self, params: Pytree, batch: dict[str, jax.Array], cfg: ModelConfig, *,
           rng: jax.Array | None = None, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """The loss and (through autodiff) its gradient run per device in a shard_map over the
    whole mesh.

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
    pick = vocab_sharded_log_probs if self.model_size > 1 else model.target_log_probs
    smoothing = {"label_smoothing": label_smoothing} if label_smoothing else {}

    def local(params, batch, rng):
      switches = dict(smoothing)
      if rng is not None:  # this device's rows draw the dropout masks of their global rows
        switches.update(rng=rng, first_row=lax.axis_index(DATA) * batch["tgt"].shape[0])
      _, aux = model.loss_fn(params, batch, cfg, pick, **switches)
      aux = lax.psum(aux, DATA)
      return aux.get("loss_sum", aux["nll_sum"]) / jnp.maximum(aux["num_sents"], 1), aux

    specs = jax.tree_util.tree_map(lambda s: s.spec, self.shardings(params))
    return jax.shard_map(local, mesh=self.mesh, in_specs=(specs, P(DATA), P()),
                         out_specs=P(), check_vma=False)(params, batch, rng)
