"""The paper's gradient clipping and learning-rate schedule; optimizers by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2s_jax import optim, train
from s2s_jax.config import ConfigError, ModelConfig, OptimConfig


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


def test_bad_optimizer_names_and_kwargs_are_refused_by_the_config():
  with pytest.raises(ConfigError, match="bad value 'adamm' for optim.name: allowed: an optax"):
    OptimConfig(name="adamm")
  with pytest.raises(ConfigError, match=r"bad value \{'beta1': 0.9\} for optim.kwargs: .*"
                     r"optax.adam takes b1, b2, eps"):
    OptimConfig(name="adam", kwargs={"beta1": 0.9})
  with pytest.raises(ConfigError, match="bad value 'global_norm' for optim.name"):
    OptimConfig(name="global_norm")  # an optax function, but no optimizer: no learning_rate


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_learning_rate_follows_the_steps_skipped_ones_included(name):
  """Step 6 of a run that skipped 2 non-finite steps (optax has applied 4 updates) uses lr(6),
  the rate the log shows and the decay boundaries count in steps; adam's own count (its bias
  correction) still counts the updates it applied."""
  cfg = OptimConfig(name=name, learning_rate=0.7, clip_norm=0.0, decay_start_epoch=1.0,
                    decay_every_epochs=1.0)
  tx, schedule = optim.make_optimizer(cfg, 6)  # halves at step 6
  assert float(schedule(4)) == pytest.approx(0.7) and float(schedule(6)) == pytest.approx(0.35)
  w, x = jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 0.25, -1.0])
  loss_fn = lambda p, batch, _: (jnp.dot(p["w"], batch["x"]), {"nll_sum": 0.0, "num_tokens": 1})
  opt_state = train.schedule_at(tx.init({"w": w}), jnp.int32(4))  # 4 updates applied
  state = train.TrainState({"w": w}, opt_state, jnp.int32(6))
  new, metrics = train.train_step(state, {"x": x}, cfg=ModelConfig(), tx=tx, loss_fn=loss_fn)
  assert bool(metrics["finite"]) and int(new.step) == 7
  step = x if name == "sgd" else jnp.sign(x)  # adam's first update: lr * sign(gradient)
  np.testing.assert_allclose(new.params["w"], w - 0.35 * step, rtol=1e-5)
  kinds = (optax.ScaleByScheduleState, optax.ScaleByAdamState)
  counts = {type(s).__name__: int(s.count) for s in jax.tree_util.tree_leaves(
      new.opt_state, is_leaf=lambda s: isinstance(s, kinds)) if isinstance(s, kinds)}
  assert counts == ({"ScaleByScheduleState": 7} if name == "sgd" else
                    {"ScaleByScheduleState": 7, "ScaleByAdamState": 1})
