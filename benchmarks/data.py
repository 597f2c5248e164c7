"""Corpus preparation at scale: pairs/s, time to first batch, memory, for N pairs.

  python -m benchmarks.data --pairs 200000,1000000,4000000 [--from DIR] [--tokenizer moses]
                            [--first-step] [--evaluate]

Builds a text corpus of N training pairs (the lines of DIR's train.{en,fr} repeated, or the
embedded grammar's pairs when no DIR is given) in a temporary folder, then in fresh processes:
  first   load_corpus with an empty data store: streaming, tokenizing in a process pool,
          writing the memory-mapped arrays, vocabularies, the first training batch;
  reused  the same in a new process and a new WORKDIR, with the store now filled.
  step    (--first-step) experiments.wmt14's paper preset on that prepared corpus, in a new
          process and WORKDIR: seconds from the start of train() to the end of its first
          step (corpus, vocabularies, model initialization, compilation, one step).
  evaluate  (--evaluate) `python -m s2s_jax.evaluate --split test --beam_size 1` in a new
          process, on a tiny model (vocabularies of 2000, perplexity batches of 32, so that
          its arrays stay small) trained once beforehand on the same text (its WORKDIR copied
          and pointed at the corpus of N pairs): seconds and peak resident memory, which
          should not depend on the size of the training split (the fastest of 3 runs, the
          largest peak).
Reports seconds, pairs/s, peak resident memory of the main process, and the corpus memory
per token (resident growth after load_corpus, and after every token id has been read once),
then the growth between sizes and the extrapolation to 12M and 40M pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_corpus(folder: str, n: int, source: str | None) -> float:
  """N train pairs (and 3000 valid/test pairs) as a text folder; returns words a sentence."""
  if source:
    with open(os.path.join(source, "train.en"), encoding="utf-8") as f:
      en = f.read().splitlines()
    with open(os.path.join(source, "train.fr"), encoding="utf-8") as f:
      fr = f.read().splitlines()
    base = list(zip(en, fr))
  else:
    from s2s_jax.data import synthetic
    base = synthetic.generate_pairs(50_000, seed=0)
  os.makedirs(folder, exist_ok=True)
  for split, size in (("train", n), ("valid", 3000), ("test", 3000)):
    with open(os.path.join(folder, f"{split}.en"), "w", encoding="utf-8") as fe, \
         open(os.path.join(folder, f"{split}.fr"), "w", encoding="utf-8") as ff:
      for s, t in itertools.islice(itertools.cycle(base), size):
        fe.write(s + "\n")
        ff.write(t + "\n")
  return float(np.mean([len(s.split()) for s, _ in base]))


def child(args) -> None:
  """One measured load in this process; prints a JSON line."""
  from s2s_jax.config import DataConfig
  from s2s_jax.data import pipeline
  t0 = time.perf_counter()
  base = rss_mb()
  cfg = DataConfig(source="text", path=args.folder, tokenizer=args.tokenizer,
                   prepared_dir=args.store, max_len=50)
  corpus = pipeline.load_corpus(cfg, args.workdir)
  t_corpus = time.perf_counter() - t0
  batches = pipeline.BatchIterator(corpus.examples["train"], 128, 2, seed=0)
  next(batches)
  t_batch = time.perf_counter() - t0
  after_load = rss_mb() - base
  train = corpus.prepared.splits["train"]
  tokens = int(len(train.ids[0]) + len(train.ids[1]))
  for ids in train.ids:  # read every token id once (as an epoch does)
    for start in range(0, len(ids), 1 << 24):
      int(ids[start:start + (1 << 24)].sum())
  after_all = rss_mb() - base
  print(json.dumps({"seconds_corpus": t_corpus, "seconds_first_batch": t_batch,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "children_peak_rss_mb":
                        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                    "bytes_per_token_loaded": after_load * 2**20 / tokens,
                    "bytes_per_token_all_read": after_all * 2**20 / tokens,
                    "tokens": tokens, "pairs": len(train)}))


def first_step(args) -> None:
  """The paper preset's first step on the prepared corpus, in this process; prints JSON."""
  import dataclasses

  from experiments import wmt14
  from s2s_jax import train
  cfg = wmt14.config()
  cfg = dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, source="text", path=args.folder,
                                    tokenizer=args.tokenizer, prepared_dir=args.store,
                                    max_eval_sentences=8),
      train=dataclasses.replace(cfg.train, num_steps=1, eval_every=0, log_every=1))
  result = train.train(cfg, args.workdir, progress=False)
  print(json.dumps({"seconds_to_first_step": result["seconds_to_first_step"],
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def evaluate_child(args) -> None:
  """`python -m s2s_jax.evaluate --split test` in this process; prints a JSON line."""
  from s2s_jax import evaluate
  t0 = time.perf_counter()
  rc = evaluate.main(["--workdir", args.workdir, "--split", "test", "--beam_size", "1"])
  print(json.dumps({"status": rc, "seconds": time.perf_counter() - t0,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def tiny_model(args) -> None:
  """Trains, in this process, a tiny model for one step on the corpus `args.folder` into the
  WORKDIR `args.workdir` (the model that --evaluate decodes with)."""
  from s2s_jax import config as config_lib
  from s2s_jax import train
  cfg = config_lib.override(config_lib.Config(), {
      "data.source": "text", "data.path": args.folder, "data.tokenizer": args.tokenizer,
      "data.prepared_dir": args.store, "model.num_layers": 1, "model.hidden_size": 16,
      "model.embed_size": 16, "train.num_steps": 1, "train.eval_every": 0,
      "data.max_eval_sentences": 8, "train.eval_batch_size": 32,
      "data.src_vocab_size": 2000, "data.tgt_vocab_size": 2000})
  train.train(cfg, args.workdir, progress=False)
  print(json.dumps({"workdir": args.workdir}))


def pointed_at(model: str, workdir: str, text: str) -> str:
  """A copy of the WORKDIR `model` whose config reads the corpus in the folder `text`."""
  from s2s_jax import config as config_lib
  shutil.copytree(model, workdir)
  path = os.path.join(workdir, "config.json")
  config_lib.save_json(config_lib.override(config_lib.load_json(path), {"data.path": text}), path)
  return workdir


def run_child(folder: str, store: str, workdir: str, tokenizer: str, mode: str = "--child") -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.data", mode, "--folder", folder,
                        "--store", store, "--workdir", workdir, "--tokenizer", tokenizer],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--pairs", default="200000,1000000,4000000", help="comma-separated sizes")
  p.add_argument("--from", dest="source", default="", help="text folder with train.{en,fr}")
  p.add_argument("--tokenizer", default="none", help="none | moses")
  p.add_argument("--first-step", action="store_true",
                 help="also time the paper preset's first step on each prepared corpus")
  p.add_argument("--evaluate", action="store_true",
                 help="also time evaluate --split test with each training split")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--step-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--eval-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--model-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--folder", help=argparse.SUPPRESS)
  p.add_argument("--store", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args)
  if args.step_child:
    return first_step(args)
  if args.eval_child:
    return evaluate_child(args)
  rows, evals = [], []
  if args.model_child:
    return tiny_model(args)
  model_dir = tempfile.mkdtemp(prefix="s2s_data_bench_model_") if args.evaluate else None
  model = None
  if args.evaluate:  # in another process: a child's peak memory counts its parent's at its start
    write_corpus(os.path.join(model_dir, "text"), 20_000, args.source)
    model = run_child(os.path.join(model_dir, "text"), os.path.join(model_dir, "store"),
                      os.path.join(model_dir, "model"), args.tokenizer, "--model-child")["workdir"]
  print(f"tokenizer={args.tokenizer}, {os.cpu_count()} CPUs, corpus from "
        f"{args.source or 'the embedded grammar'}")
  print(f"{'pairs':>9} {'words/sent':>10} {'first s':>8} {'pairs/s':>8} {'reused s':>8} "
        f"{'1st batch s':>11} {'peak MB':>8} {'B/token':>8} {'B/token read':>12}"
        + (f" {'1st step s':>10}" if args.first_step else "")
        + (f" {'eval s':>7} {'eval MB':>8}" if args.evaluate else ""))
  for n in [int(x) for x in args.pairs.split(",")]:
    tmp = tempfile.mkdtemp(prefix="s2s_data_bench_")
    try:
      words = write_corpus(os.path.join(tmp, "text"), n, args.source)
      store = os.path.join(tmp, "store")
      first = run_child(os.path.join(tmp, "text"), store, os.path.join(tmp, "wd1"), args.tokenizer)
      reused = run_child(os.path.join(tmp, "text"), store, os.path.join(tmp, "wd2"),
                         args.tokenizer)
      step = (run_child(os.path.join(tmp, "text"), store, os.path.join(tmp, "wd3"),
                        args.tokenizer, "--step-child") if args.first_step else None)
      ev = None
      if args.evaluate:  # the fastest of 3 runs (the machine is shared), the largest memory
        wd = pointed_at(model, os.path.join(tmp, "wd4"), os.path.join(tmp, "text"))
        runs = [run_child(os.path.join(tmp, "text"), store, wd, args.tokenizer, "--eval-child")
                for _ in range(3)]
        ev = {"seconds": min(r["seconds"] for r in runs),
              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    rows.append((n, first, reused, step))
    evals.append((n, ev))
    print(f"{n:>9} {words:>10.1f} {first['seconds_corpus']:>8.1f} "
          f"{n / first['seconds_corpus']:>8.0f} {reused['seconds_corpus']:>8.2f} "
          f"{reused['seconds_first_batch']:>11.2f} "
          f"{max(first['peak_rss_mb'], reused['peak_rss_mb']):>8.0f} "
          f"{reused['bytes_per_token_loaded']:>8.2f} {reused['bytes_per_token_all_read']:>12.2f}"
          + (f" {step['seconds_to_first_step']:>10.1f}" if step else "")
          + (f" {ev['seconds']:>7.1f} {ev['peak_rss_mb']:>8.0f}" if ev else ""), flush=True)
  if len(rows) > 1:
    (n0, f0, r0, s0), (n1, f1, r1, s1) = rows[0], rows[-1]
    grow = lambda a, b: (np.log(b) - np.log(a)) / (np.log(n1) - np.log(n0))
    e_first = grow(f0["seconds_corpus"], f1["seconds_corpus"])
    e_reused = grow(r0["seconds_first_batch"], r1["seconds_first_batch"])
    print(f"growth exponent (time ~ N^k) from {n0} to {n1}: first k={e_first:.2f}, "
          f"reused to first batch k={e_reused:.2f}"
          + (f", paper preset's first step k="
             f"{grow(s0['seconds_to_first_step'], s1['seconds_to_first_step']):.2f}" if s0 else ""))
    rate = n1 / f1["seconds_corpus"]
    for big in (12_000_000, 40_000_000):
      reuse = r1["seconds_first_batch"] * (big / n1) ** max(e_reused, 0)
      print(f"extrapolated to {big / 1e6:.0f}M pairs: first {big / rate / 60:.1f} min at "
            f"{rate:.0f} pairs/s, reused to first batch {reuse:.1f} s")
  if args.evaluate and len(evals) > 1:
    (n0, e0), (n1, e1) = evals[0], evals[-1]
    print(f"evaluate --split test with {n1} training pairs against {n0}: "
          f"{e1['seconds'] / e0['seconds']:.2f}x the time, "
          f"{e1['peak_rss_mb'] / e0['peak_rss_mb']:.2f}x the peak memory")
  if model_dir:
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
