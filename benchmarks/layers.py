"""The paper's layout against data parallelism: training words/s in one run.

  python -m benchmarks.layers [--devices 8] [--steps 8] [--hidden 256] [--vocab 8000]
      [--batch 64] [--length 20] [--softmax 4]

Times the train step (train.make_steps, SGD, clip 5) of one model under
  layers  parallel.strategy=layers: LSTM layer l on device l, the softmax split over
          --softmax more devices (4 + 4 on 8 devices: the paper's layout), data parallel over
          the rest;
  mesh    parallel.strategy=mesh with the batch split over all devices (data parallel);
  one     one device, no layout;
interleaved round by round (medians), from the same initial weights and batch. Words are
source + target tokens, as the paper counts them. Without a GPU the devices are virtual CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count, appended here before JAX starts):
they share the machine's cores, so the figures compare the programs' overheads, not what
separate chips would give. On a machine with enough GPUs JAX uses those instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.layers",
                              description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (no effect on GPUs)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--softmax", type=int, default=4, help="softmax devices (parallel.model)")
  p.add_argument("--hidden", type=int, default=256, help="hidden = embedding size")
  p.add_argument("--vocab", type=int, default=8000, help="source and target vocabulary")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=20, help="source and target length")
  p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
  args = p.parse_args(argv)

  flag = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  import jax
  import numpy as np

  from s2s_jax import optim, parallel, train
  from s2s_jax.config import Config, ParallelConfig, override

  cfg = override(Config(), {
      "model.num_layers": args.layers, "model.hidden_size": args.hidden,
      "model.embed_size": args.hidden, "train.batch_size": args.batch})
  tx, _ = optim.make_optimizer(cfg.optim, steps_per_epoch=1000)
  rng = np.random.default_rng(0)
  batch = {"src": rng.integers(4, args.vocab, (args.batch, args.length), dtype=np.int32),
           "tgt": rng.integers(4, args.vocab, (args.batch, args.length), dtype=np.int32)}
  batch["tgt"][:, -1] = 3  # </s>
  words = train.count_words(batch)
  n = jax.device_count()
  variants = {
      f"layers {args.layers}+{args.softmax}": ParallelConfig(strategy="layers", model=args.softmax),
      f"mesh data={n}": ParallelConfig(strategy="mesh", data=n),
      "one device": None}
  runs, times = {}, {}
  for name, pcfg in variants.items():
    layout = None if pcfg is None else parallel.make(
        pcfg, num_layers=args.layers, batch_sizes={"train.batch_size": args.batch})
    step, _ = train.make_steps(cfg, tx, layout)
    state = train.init_state(cfg, tx, args.vocab, args.vocab)
    holder = {"state": state if layout is None else layout.place(state)}

    def run(step=step, holder=holder):
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)
      return float(metrics["loss"])

    t0 = time.perf_counter()
    loss = [run() for _ in range(args.warmup)][0]
    mesh = "" if layout is None else str(dict(layout.mesh.shape))
    print(f"{name}: mesh {mesh or '-'}, first loss {loss:.4f}, compile + {args.warmup} steps "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    runs[name], times[name] = run, []
  for _ in range(args.steps):  # interleaved: load from other processes hits every variant alike
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)

  print(f"{jax.devices()[0].platform} x {n} devices ({jax.devices()[0].device_kind}); "
        f"L={args.layers} H=E={args.hidden} V={args.vocab} batch {args.batch} x {args.length}+"
        f"{args.length} tokens, {args.steps} steps each")
  print(f"{'variant':<16} {'step ms':>9} {'words/s':>9}")
  wps = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    wps[name] = words / med
    print(f"{name:<16} {1e3 * med:>9.1f} {wps[name]:>9.0f}")
  layers_name, mesh_name = list(variants)[:2]
  print(f"ratio layers/mesh={wps[layers_name] / wps[mesh_name]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
