"""The interface every parallel strategy implements, and the layout checks they share."""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
from jax.sharding import Mesh

from s2s_jax.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from s2s_jax.parallel import devices as dev

Pytree = Any
# (params, batch, cfg) -> (loss, aux): model.loss_fn's contract, as a strategy computes it
LossFn = Callable[[Pytree, dict[str, jax.Array], ModelConfig], tuple[jax.Array, dict]]
StepFn = Callable[..., Any]


class Strategy(abc.ABC):
  """How a run uses its devices (parallel.strategy): the mesh, where the train state lives,
  the loss as the devices compute it, and the compiled steps.

  Every strategy trains exactly like one device (up to the order of float sums). The train
  state enters as the canonical pytree (`train.init_state`, what checkpoints hold); `place`
  puts it on the devices in the strategy's own form and `to_canonical` brings it back.
  """
  name: ClassVar[str]  # the parallel.strategy value

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  @classmethod
  @abc.abstractmethod
  def create(cls, cfg: ParallelConfig, devices: Sequence[jax.Device],
             num_layers: int) -> Strategy:
    """The strategy for `cfg` on `devices`; a ConfigError when the layout does not fit."""

  @property
  def data_size(self) -> int:
    """Data-parallel replicas: the global batch is split over this many."""
    return self.mesh.shape[dev.DATA]

  @property
  def model_size(self) -> int:
    """Devices sharing the target softmax."""
    return 1

  def check_optimizer(self, cfg: OptimConfig) -> None:
    """A ConfigError for an optimizer this strategy cannot run exactly."""

  def check_model(self, cfg: ModelConfig, optim: OptimConfig) -> None:
    """A ConfigError for a model switch (model.attention, model.dropout, ...) or
    optim.label_smoothing that this strategy does not run."""

  @abc.abstractmethod
  def shardings(self, state: Pytree) -> Pytree:
    """A NamedSharding per leaf of a placed train state (or params)."""

  def place(self, state: Pytree) -> Pytree:
    """The canonical train state (or params), the same on every process, on the devices."""
    return jax.tree_util.tree_map(dev.put, state, self.shardings(state))

  def to_canonical(self, state: Pytree) -> Pytree:
    """A placed state in the canonical form (what checkpoints hold)."""
    return state

  def from_canonical(self, state: Pytree) -> Pytree:
    """A canonical state restored onto the shardings of `to_canonical(place(...))`, back in
    the strategy's form."""
    return state

  @abc.abstractmethod
  def loss(self, params: Pytree, batch: dict[str, jax.Array], cfg: ModelConfig, *,
           rng: jax.Array | None = None, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """model.loss_fn as the devices compute it, on placed params and a placed batch (`rng`,
    `label_smoothing`: the training switches of model.loss_fn, for the whole global batch)."""

  def reduce(self, tree: Pytree) -> Pytree:
    """What the train step applies to (loss, aux, grads) before the update (a sum over
    devices where each computes a share)."""
    return tree

  def place_batch(self, batch: Pytree) -> Pytree:
    """A global host batch (the same numpy batch on every process) on the devices, as the
    compiled steps take it; each process transfers only its own rows. A placed batch is
    returned as it is. The training loop calls this ahead, on a background thread."""
    return batch if dev.is_placed(batch) else dev.place_batch(self.mesh, batch)

  def compile(self, train_step: StepFn, eval_step: StepFn) -> tuple[StepFn, StepFn]:
    """Compiles `train_step(state, batch)` (state donated) and `eval_step(params, batch)`,
    both bound to their config. The results take placed states and global host batches (the
    same numpy batch on every process) or batches already placed by `place_batch`, and return
    replicated metrics.

    This default jits both over the mesh, the batch split by rows over `data`, and keeps the
    new state on `shardings`."""
    def train_keep_layout(state, batch):
      new_state, metrics = train_step(state, batch)
      return jax.lax.with_sharding_constraint(new_state, self.shardings(new_state)), metrics

    j_train = jax.jit(train_keep_layout, donate_argnums=0)
    j_eval = jax.jit(eval_step)
    return (lambda state, batch: j_train(state, self.place_batch(batch)),
            lambda params, batch: j_eval(params, self.place_batch(batch)))

  def host_rows(self, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices get (all of them on one host):
    the batch iterators read only those sentences."""
    return dev.process_rows(dev.batch_sharding(self.mesh), (batch_size, 1))

  def check_batch_sizes(self, batch_sizes: Mapping[str, int], num_devices: int) -> None:
    """A ConfigError naming the sizes that fit when a global batch ({"train.batch_size": 128,
    ...}) does not split evenly over the data axis."""
    data = self.data_size
    group = self.mesh.size // data  # devices per data replica
    for name, size in batch_sizes.items():
      if size % data == 0:
        continue
      lower, upper = (size // data) * data, (size // data + 1) * data
      examples = " or ".join(str(x) for x in (lower, upper) if x > 0)
      fits = [d for d in dev.divisors(size) if d * group <= num_devices]
      raise ConfigError(
          f"{name}={size} does not divide by the data-parallel size {data} ({num_devices} "
          f"devices, {group} per data replica under parallel.strategy={self.name}): use a "
          f"multiple of {data} (e.g. {examples}), or set parallel.data to one of "
          f"{', '.join(map(str, fits))}")


def data_replicas(cfg: ParallelConfig, num_devices: int, group: int, group_name: str,
                  other_groups: str) -> int:
  """parallel.data resolved: the number of replicas of `group` devices (`group_name` says what
  they are; `other_groups` what to try when they do not divide the devices)."""
  n = num_devices
  if group > n:
    raise ConfigError(f"{group_name} devices per data replica, but only {n} are available")
  if cfg.data == -1:
    if n % group:
      raise ConfigError(f"{group_name} devices per data replica do not divide the {n} devices: "
                        f"{other_groups}, or set parallel.data explicitly")
    data = n // group
  elif cfg.data >= 1:
    data = cfg.data
  else:
    raise ConfigError(f"parallel.data must be -1 (all devices) or >= 1, got {cfg.data}")
  if data * group > n:
    raise ConfigError(f"parallel.data={data} replicas x {group_name} devices, but only {n} are "
                      "available")
  if jax.process_count() > 1 and data * group != n:
    raise ConfigError(f"a multi-host run must use all {n} devices; parallel.data={data} "
                      f"replicas x {group_name} devices leave some out")
  return data
