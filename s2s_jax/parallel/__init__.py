"""Many devices and many hosts: one `Strategy` object per parallel.strategy.

  mesh    (mesh.py) jit over a (data, model) mesh: the batch split by rows over `data`, the
          target softmax optionally split along the vocabulary over `model`.
  pmap    (pmap.py) jax.pmap over the data devices, each computing its share of the loss.
  layers  (layers.py) the paper's layout: LSTM layer l on device l, the softmax on more
          devices, the layers run as a wavefront over time.

All three train exactly like one device (up to the order of float sums) and share one
interface (base.py): `make` picks one from the config and checks that it fits the devices;
the training loop then only calls its methods. devices.py holds the helpers they share.

Multi-host: `initialize` starts `jax.distributed`; every process builds the same global
batch from the same seeded iterator and hands only its own rows to the devices. Checkpoints
hold global arrays in the canonical form, so a run can resume under any strategy and device
count.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax

from s2s_jax.config import ConfigError, ParallelConfig
from s2s_jax.parallel.base import Strategy
from s2s_jax.parallel.layers import LayersStrategy
from s2s_jax.parallel.mesh import MeshStrategy
from s2s_jax.parallel.pmap import PmapStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (MeshStrategy, PmapStrategy, LayersStrategy)}


def make(cfg: ParallelConfig, *, num_layers: int, batch_sizes: Mapping[str, int] | None = None,
         devices: Sequence[jax.Device] | None = None) -> Strategy:
  """The strategy cfg.strategy names, on `devices` (default: all), for a model of
  `num_layers` LSTM layers; checks that every global batch in `batch_sizes`
  ({"train.batch_size": 128, ...}) divides by the data-parallel size."""
  devices = list(jax.devices() if devices is None else devices)
  strategy = STRATEGIES[cfg.strategy].create(cfg, devices, num_layers)
  strategy.check_batch_sizes(batch_sizes or {}, len(devices))
  return strategy


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
