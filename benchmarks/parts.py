"""Where a train step's time goes: its parts jitted and timed alone (ours only, no PyTorch).

  python -m benchmarks.parts --config tiny|small|medium|paper [--dtype bfloat16|float32]
      [--reps 7] [--kernels auto|plain|cpu]

Prints the median time of: the whole donated train step; the loss forward; the softmax loss
forward+backward and forward alone; one LSTM stack (encoder-sized) forward+backward and forward
alone; the output projection's product alone. Parts are timed in isolation, so they do not add
up exactly to the step (XLA fuses across them inside the step). The softmax loss and the LSTM
layers are the functions the step runs under model.kernels (model.target_log_probs,
model.layer_fn): cpu_kernels on a CPU backend, plain JAX elsewhere (--kernels picks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from benchmarks.compare import CONFIGS, Shape, _timed, make_batch, model_config


def median_ms(fn: Callable, *args, reps: int) -> float:
  """Median wall time of fn(*args), finished, after two untimed runs (compilation, warm-up)."""
  run = lambda: jax.block_until_ready(fn(*args))
  run()
  run()
  return 1e3 * statistics.median(_timed(run) for _ in range(reps))


def main(argv: list[str] | None = None) -> int:
  from s2s_jax import config as config_lib
  from s2s_jax import lstm, model, optim, train
  p = argparse.ArgumentParser(prog="python -m benchmarks.parts", description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="medium")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--kernels", choices=config_lib.KERNELS, default="auto", help="model.kernels")
  args = p.parse_args(argv)
  s = Shape(*CONFIGS[args.config])
  cfg = config_lib.override(model_config(s, args.dtype), {"model.kernels": args.kernels})
  tx, _ = optim.make_optimizer(cfg.optim, steps_per_epoch=1000)
  holder = {"state": train.init_state(cfg, tx, s.src_vocab, s.tgt_vocab)}
  batch = jax.device_put(make_batch(s))
  step, _ = train.make_steps(cfg, tx)

  def full_step():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  rows = [("train step (donated state)", median_ms(full_step, reps=args.reps))]
  params = holder["state"].params
  rows.append(("loss forward", median_ms(jax.jit(lambda p, b: model.loss_fn(p, b, cfg.model)[0]),
                                         params, batch, reps=args.reps)))
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  h_TxBxH = jax.random.normal(k1, (s.length, s.batch, s.hidden))
  tgt_TxB = batch["tgt"].T
  sm = lambda sp, h: jnp.sum(model.target_log_probs({"softmax": sp}, h, tgt_TxB, cfg.model))
  rows.append(("softmax loss fwd+bwd", median_ms(jax.jit(jax.grad(sm, argnums=(0, 1))),
                                                 params["softmax"], h_TxBxH, reps=args.reps)))
  rows.append(("softmax loss fwd", median_ms(jax.jit(sm), params["softmax"], h_TxBxH,
                                             reps=args.reps)))
  dtype = model.compute_dtype(cfg.model)
  w = params["softmax"]["w"]
  h_NxH = h_TxBxH.reshape(-1, s.hidden)
  rows.append(("output product alone", median_ms(jax.jit(lambda h, w: lstm.matmul(h, w, dtype)),
                                                 h_NxH, w, reps=args.reps)))
  x_TxBxE = jax.random.normal(k2, (s.length, s.batch, s.hidden))
  mask_TxB = jnp.ones((s.length, s.batch))
  s0 = lstm.zero_state(s.layers, s.batch, s.hidden)
  st = lambda ps, x: jnp.sum(lstm.stack(ps, x, mask_TxB, s0, dtype, model.layer_fn(cfg.model))[0])
  rows.append(("one LSTM stack fwd+bwd", median_ms(jax.jit(jax.grad(st, argnums=(0, 1))),
                                                   params["encoder"], x_TxBxE, reps=args.reps)))
  rows.append(("one LSTM stack fwd", median_ms(jax.jit(st), params["encoder"], x_TxBxE,
                                               reps=args.reps)))
  print(f"config {args.config} {s}, {args.dtype}, kernels {args.kernels}, median of {args.reps}")
  print("| part | ms |\n|---|---:|")
  for name, ms in rows:
    print(f"| {name} | {ms:,.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
