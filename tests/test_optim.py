"""The paper's gradient clipping and learning-rate schedule; optimizers by name."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2s_jax import optim
from s2s_jax.config import ConfigError, OptimConfig


def paper_clip(grads, threshold=5.0):
  """The paper's rule by hand: s = ||g||_2 over all parameters; if s > 5, g = 5 g / s."""
  s = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  return {k: g * threshold / s if s > threshold else g for k, g in grads.items()}, s


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_clipping_equals_paper_rule(scale):
  rng = np.random.default_rng(0)
  grads = {"a": rng.normal(size=(3, 4)) * scale, "b": rng.normal(size=(5,)) * scale}
  expected, norm = paper_clip(grads)
  assert (norm > 5) == (scale == 30.0)
  # plain SGD with lr 1 turns the update into -clipped gradient
  tx, _ = optim.make_optimizer(OptimConfig(name="sgd", learning_rate=1.0, schedule="constant"), 10)
  params = {k: jnp.zeros_like(v, dtype=jnp.float32) for k, v in grads.items()}
  updates, _ = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()},
                         tx.init(params), params)
  for k in grads:
    np.testing.assert_allclose(-np.asarray(updates[k]), expected[k], rtol=1e-5, atol=1e-6)


def test_paper_schedule_boundaries():
  """First halving AT epoch 5.0, then every half epoch; 7.5 epochs in all."""
  spe = 1000  # steps per epoch
  sched = optim.learning_rate_schedule(OptimConfig(), spe)
  at = lambda epoch: float(sched(int(round(epoch * spe))))
  assert at(0) == pytest.approx(0.7)
  assert float(sched(5 * spe - 1)) == pytest.approx(0.7)  # last step of epoch 5
  assert at(5) == pytest.approx(0.35)
  assert at(5.5) == pytest.approx(0.175)
  assert at(6) == pytest.approx(0.0875)
  assert float(sched(int(7.5 * spe) - 1)) == pytest.approx(0.7 / 32)  # the run's last step
  assert at(7.5) == pytest.approx(0.7 / 64)


def test_schedule_with_uneven_epochs():
  sched = optim.learning_rate_schedule(OptimConfig(), 7)  # 5 * 7 = 35, half epoch = 3.5 -> 4 steps
  lrs = [float(sched(s)) for s in range(34, 44)]
  np.testing.assert_allclose(lrs, [0.7, 0.35, 0.35, 0.35, 0.35, 0.175, 0.175, 0.175, 0.175, 0.0875],
                             rtol=1e-6)


def test_any_optax_optimizer_by_name():
  cfg = OptimConfig(name="adam", learning_rate=1e-3, kwargs={"b1": 0.8}, schedule="constant")
  tx, _ = optim.make_optimizer(cfg, 10)
  p = {"w": jnp.ones(3)}
  u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
  np.testing.assert_allclose(u["w"], -1e-3 * np.ones(3), rtol=1e-3)  # adam's first step is -lr*sign
  for name in ("adafactor", "adamw", "rmsprop", "lion"):
    optim.make_optimizer(OptimConfig(name=name, learning_rate=1e-3, schedule="constant"), 10)


def test_bad_optimizer_names_and_kwargs():
  with pytest.raises(ConfigError, match="not an optax optimizer"):
    optim.make_optimizer(OptimConfig(name="adamm"), 10)
  with pytest.raises(ConfigError, match="no argument"):
    optim.make_optimizer(OptimConfig(name="adam", kwargs={"beta1": 0.9}), 10)
  with pytest.raises(ConfigError, match="no learning_rate"):
    optim.make_optimizer(OptimConfig(name="global_norm"), 10)
