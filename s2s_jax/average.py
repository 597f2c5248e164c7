"""Checkpoint averaging: a WORKDIR whose parameters are the mean of a run's last N checkpoints.

    python -m s2s_jax.average --workdir RUN --last N --out DIR

Reads the parameters of RUN's newest N checkpoints (each verified against its checksums) and
writes DIR, a WORKDIR every command reads like RUN (translate, evaluate, rescore, the
analyses): RUN's config.json, vocabularies, tokenizer models and metrics.jsonl, and one
checkpoint, at the newest of the N steps, holding the element-wise mean of the N parameter
sets (computed in float64, stored as float32) and the step. It holds no optimizer state, so it
is for decoding, not for resuming training. DIR/average.json names the run and the steps. The
run keeps only train.keep_checkpoints checkpoints (3 by default): raise it before training to
average more.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
from typing import Any, Sequence

import jax
import numpy as np

from s2s_jax import checkpoint, cli, model
from s2s_jax import config as config_lib
from s2s_jax.data import pipeline
from s2s_jax.workdir import CONFIG_FILE, METRICS_FILE

RECORD = "average.json"


def mean_params(trees: Sequence[Any]) -> Any:
  """The element-wise mean of parameter pytrees of one structure, float64 sums, float32 out."""
  return jax.tree_util.tree_map(
      lambda *xs: (sum(np.asarray(x, np.float64) for x in xs) / len(xs)).astype(np.float32),
      *trees)


def run_files(workdir: str) -> list[str]:
  """What of a WORKDIR the averaged one copies: the config, vocabularies, tokenizer models and
  the training metrics."""
  names = [CONFIG_FILE, pipeline.SRC_VOCAB_FILE, pipeline.TGT_VOCAB_FILE, METRICS_FILE]
  found = [os.path.join(workdir, n) for n in names if os.path.exists(os.path.join(workdir, n))]
  return found + sorted(glob.glob(os.path.join(workdir, "spm.*")))


def average(workdir: str, last: int, out: str) -> dict[str, Any]:
  """Writes the averaged WORKDIR `out` (see the module doc); returns what average.json holds."""
  if last < 1:
    raise ValueError(f"--last must be >= 1, got {last}")
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError(f"--out {out} is the run's own WORKDIR: choose a new folder")
  if os.path.exists(os.path.join(out, checkpoint.CHECKPOINT_DIR)):
    raise ValueError(f"{out} holds checkpoints already: choose a new folder (or remove it)")
  cfg = config_lib.load_json(os.path.join(workdir, CONFIG_FILE))
  steps = sorted(checkpoint.manager(workdir, read_only=True).all_steps())
  if len(steps) < last:
    raise ValueError(f"{workdir}: {len(steps)} checkpoint(s) (steps {steps}), fewer than "
                     f"--last {last}; train.keep_checkpoints sets how many a run keeps")
  src_vocab, tgt_vocab = pipeline.load_vocabs(workdir)
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg.model,
                                                  len(src_vocab), len(tgt_vocab)))
  chosen = steps[-last:]
  trees = [jax.device_get(checkpoint.restore_params(workdir, like, s)[0]) for s in chosen]
  os.makedirs(out, exist_ok=True)
  for path in run_files(workdir):
    shutil.copy(path, out)
  mngr = checkpoint.manager(out, keep=1)
  state = {"params": mean_params(trees), "step": np.int32(chosen[-1])}
  checkpoint.save(mngr, chosen[-1], state, {"averaged_steps": chosen})
  mngr.wait_until_finished()
  record = {"workdir": os.path.abspath(workdir), "steps": chosen, "step": chosen[-1]}
  with open(os.path.join(out, RECORD), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
  return record


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.average",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the training WORKDIR")
  parser.add_argument("--last", type=int, required=True, help="how many newest checkpoints")
  parser.add_argument("--out", required=True, help="the new WORKDIR")
  args = parser.parse_args(argv)
  record = average(args.workdir, args.last, args.out)
  logging.info("averaged steps %s of %s into %s", record["steps"], args.workdir, args.out)
  print(json.dumps(record, sort_keys=True))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
