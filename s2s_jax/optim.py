"""The optimizer from config: any optax optimizer by name, the paper's schedule, clipping."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from s2s_jax import config as config_lib
from s2s_jax.config import ConfigError, OptimConfig


def paper_schedule(base_lr: float, steps_per_epoch: int, decay_start_epoch: float,
                   decay_every_epochs: float, factor: float) -> Callable:
  """Constant `base_lr`, then multiplied by `factor` every `decay_every_epochs`.

  Reading of the paper's "after 5 epochs, halve every half epoch" (decay_start_epoch=5):
  the first halving happens AT epoch 5.0, i.e. the step that starts the sixth epoch already
  uses 0.35; then 0.175 from 5.5, 0.0875 from 6.0, ..., 0.7/2^5 for the last half epoch
  [7.0, 7.5). Boundaries are computed in whole steps (epoch * steps_per_epoch, rounded).
  """
  start = int(round(decay_start_epoch * steps_per_epoch))
  every = max(1, int(round(decay_every_epochs * steps_per_epoch)))

  def schedule(step):
    step = jnp.asarray(step)
    n = jnp.where(step >= start, (step - start) // every + 1, 0)
    return base_lr * jnp.asarray(factor, jnp.float32) ** n.astype(jnp.float32)

  return schedule


def learning_rate_schedule(cfg: OptimConfig, steps_per_epoch: int) -> Callable:
  if cfg.schedule == "paper":
    return paper_schedule(cfg.learning_rate, steps_per_epoch, cfg.decay_start_epoch,
                          cfg.decay_every_epochs, cfg.decay_factor)
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  raise ConfigError(f"optim.schedule must be paper or constant, got {cfg.schedule!r}")


def make_optimizer(cfg: OptimConfig,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
  """Global-norm clipping (the paper's rule) followed by `optax.<name>(lr_schedule, **kwargs)`.

  optax.clip_by_global_norm(5) is exactly the paper's: s = ||g||, g <- 5 g / s if s > 5,
  with g the gradient of the batch loss (summed NLL / number of sentences).
  """
  factory = config_lib.optax_factory(cfg.name)  # the config checked name and kwargs
  schedule = learning_rate_schedule(cfg, steps_per_epoch)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(factory(learning_rate=schedule, **dict(cfg.kwargs)))
  return optax.chain(*parts), schedule
