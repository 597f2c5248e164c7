"""Does the host hold the device back? The training loop against its own step, in one run.

  python -m benchmarks.host [--batch 128,512] [--steps 100] [--rounds 15]

For each batch size, on a model so small that its compute is negligible (1 layer of 8 cells,
a vocabulary of 36, sentences of 10-30 words), it times
  loop    the training loop (`train.Trainer.run` with the built-in hooks of `train.train`:
          metrics every train.log_every=50 steps, no validation, a checkpoint at the end),
          which builds every batch from the corpus on the host;
  step    the same compiled train step (the strategy's jitted step, traced as
          `parallel.base.Strategy.compile` traces it) called back to back on batches
          already placed on the device;
as steps/s over the same number of steps, after every padded length has been compiled and an
untimed round of the loop, in alternating rounds (medians). The ratio loop/step is 1.0 when
the host keeps up; the lower it is, the more the device waits for the host. Steps are timed
from a point where the device is idle to the end of the last step. Runs on the default device
(parallel.data=1).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from s2s_jax import optim, train
from s2s_jax.config import Config, override
from s2s_jax.data import pipeline
from s2s_jax.parallel import devices


def write_corpus(folder: str, pairs: int, lengths: tuple[int, int] = (10, 30),
                 seed: int = 0) -> None:
  """Word-for-word pairs (w3 w7 -> f3 f7) of `lengths` words (inclusive) from 32 words, as a
  text folder."""
  rng = random.Random(seed)
  os.makedirs(folder, exist_ok=True)
  for split, n in (("train", pairs), ("valid", 8), ("test", 8)):
    with open(os.path.join(folder, f"{split}.en"), "w") as fe, \
         open(os.path.join(folder, f"{split}.fr"), "w") as ff:
      for _ in range(n):
        words = [str(rng.randrange(32)) for _ in range(rng.randint(*lengths))]
        fe.write(" ".join("w" + w for w in words) + "\n")
        ff.write(" ".join("f" + w for w in words) + "\n")


def jitted_step(t: train.Trainer):
  """The strategy's compiled train step, as `Strategy.compile` builds it, taking placed batches."""
  s = t.strategy
  tx = optim.make_optimizer(t.cfg.optim, t.steps_per_epoch)[0]  # the Trainer's optimizer
  step = functools.partial(train.train_step, cfg=t.cfg.model, tx=tx, loss_fn=s.loss,
                           reduce=s.reduce)

  def keep_layout(state, batch):
    new_state, metrics = step(state, batch)
    return jax.lax.with_sharding_constraint(new_state, s.shardings(new_state)), metrics

  return jax.jit(keep_layout, donate_argnums=0)


class Marks:
  """A hook that waits for the device and notes the time after the steps it is asked about."""

  def __init__(self):
    self.at: tuple[int, ...] = ()
    self.times: dict[int, float] = {}

  def __call__(self, t: train.Trainer) -> None:
    if t.step in self.at:
      jax.block_until_ready(t.state)
      self.times[t.step] = time.perf_counter()


def loop_round(t: train.Trainer, marks: Marks, steps: int) -> float:
  """Steps/s of `steps` more steps of the training loop, timed from the end of the first (an
  idle device) to the end of the last; a multiple of train.log_every keeps the rounds aligned
  with the metrics records, as in one long run."""
  first, last = t.step + 1, t.step + steps
  marks.at, marks.times = (first, last), {}
  t.num_steps = last
  t.run()
  return (last - first) / (marks.times[last] - marks.times[first])


def step_round(t: train.Trainer, fn, batches: list) -> float:
  """Steps/s of the jitted step called on pre-placed batches (timed from an idle device)."""
  state = t.state
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for b in batches[1:]:  # as many steps as a loop round times
    state, _ = fn(state, b)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  t.state = state
  return (len(batches) - 1) / seconds


def measure(batch_size: int, steps: int, rounds: int, folder: str) -> dict:
  cfg = override(Config(), {
      "data.source": "text", "data.path": os.path.join(folder, "text"),
      "data.tokenizer": "none", "data.prepared_dir": os.path.join(folder, "store"),
      "model.num_layers": 1, "model.hidden_size": 8, "model.embed_size": 8,
      "train.batch_size": batch_size, "train.eval_batch_size": 8, "train.num_steps": 1,
      "train.eval_every": 0, "train.checkpoint_every": 0, "train.log_every": 50,
      "optim.schedule": "constant", "parallel.data": 1})
  workdir = os.path.join(folder, f"run{batch_size}")
  t = train.Trainer(cfg, workdir, progress=False)
  try:
    train.add_builtin_hooks(t)
    corpus = pipeline.load_corpus(cfg.data, workdir)
    iterator = pipeline.BatchIterator(corpus.examples["train"], batch_size, cfg.data.bucket_width,
                                      seed=1, bucket_growth=cfg.data.bucket_growth)
    marks = Marks()
    t.add_hook(marks, 1)
    fn = jitted_step(t)
    for length in iterator.shapes:  # compile every padded length, both ways, before timing
      blank = {k: np.zeros((batch_size, length), np.int32) for k in ("src", "tgt")}
      t.state, _ = t.train_fn(t.state, blank)
      t.state, _ = fn(t.state, devices.place_batch(t.strategy.mesh, blank))
    placed = [devices.place_batch(t.strategy.mesh, next(iterator)) for _ in range(steps)]
    loop_round(t, marks, 2 * cfg.train.log_every)  # untimed: the hooks' first calls import
    loop, step = [], []
    for _ in range(rounds):
      step.append(step_round(t, fn, placed))
      loop.append(loop_round(t, marks, steps))
  finally:
    t.close()
  return {"batch": batch_size, "loop": statistics.median(loop), "step": statistics.median(step),
          "ratio": statistics.median(a / b for a, b in zip(loop, step)), "shapes": iterator.shapes}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n")[0])
  p.add_argument("--batch", default="128,512", help="comma-separated batch sizes")
  p.add_argument("--steps", type=int, default=100,
                 help="steps per round and variant (a multiple of 50)")
  p.add_argument("--rounds", type=int, default=15,
                 help="rounds of each variant, alternating (short rounds: the machine is shared)")
  p.add_argument("--pairs", type=int, default=50_000, help="training pairs of the corpus")
  p.add_argument("--lengths", default="10,30", help="shortest,longest sentence in words")
  args = p.parse_args(argv)
  folder = tempfile.mkdtemp(prefix="s2s_host_bench_")
  try:
    lo, hi = (int(n) for n in args.lengths.split(","))
    write_corpus(os.path.join(folder, "text"), args.pairs, (lo, hi))
    rows = [measure(int(b), args.steps, args.rounds, folder) for b in args.batch.split(",")]
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; "
        f"{args.steps} steps a round, {args.rounds} rounds, medians")
  print(f"{'batch':>6} {'loop steps/s':>13} {'step steps/s':>13} {'loop/step':>10}  padded lengths")
  for r in rows:
    print(f"{r['batch']:>6} {r['loop']:>13.1f} {r['step']:>13.1f} {r['ratio']:>10.3f}  "
          f"{r['shapes']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
