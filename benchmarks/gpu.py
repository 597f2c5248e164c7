"""The measurements for the first GPU: the paper preset's training speed through the real
command, and our LSTM stack against cuDNN's. `bash benchmarks/gpu.sh` runs them all.

  python -m benchmarks.gpu train --dtype float32|bfloat16 --out DIR [--steps 60]
  python -m benchmarks.gpu lstm --out DIR
  add --tiny --allow-cpu to rehearse on a CPU with tiny sizes

train   runs `python -m experiments.wmt14` (the paper preset: 4 x 1000 LSTMs, vocabularies of
        160k / 80k, batch 128, SGD) as a user would, in its own process, on a corpus written
        here: random words drawn so that both vocabularies are full, 25-30 source and 24-29
        target words a sentence (one padded length, 30: a single compiled program). It
        reports training words/s as the paper counts them (source + target words, </s> and
        padding left out): the median of the metrics records after the first (which holds
        the compilation). Needs neither sacremoses, nor tensorflow-datasets nor tensorboardX.
lstm    times one LSTM stack of the paper's encoder (4 layers of 1000 cells, input 1000,
        batch 128, 30 steps), forward and forward + backward, as our `lstm.stack` (lax.scan,
        the path GPUs run) and as `jax.experimental.rnn.lstm` (cuDNN) with the same weights,
        in float32 and bfloat16, after checking that both compute the same outputs. On a CPU
        (--allow-cpu) cuDNN is not there: `jax.experimental.rnn.lstm_ref` stands in for it.
Each prints a table and writes OUT/<name>.json; the corpus and the runs go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"layers": 4, "hidden": 1000, "batch": 128, "length": 30, "src_vocab": 160_000,
         "tgt_vocab": 80_000}
TINY = {"layers": 2, "hidden": 64, "batch": 16, "length": 30, "src_vocab": 2000,
        "tgt_vocab": 1000}


def sizes(args) -> dict:
  return TINY if args.tiny else PAPER


# ----------------------------------------------------------------------------- train


def write_corpus(folder: str, shape: dict, pairs: int, seed: int = 0) -> None:
  """`pairs` training pairs of random words, every word of both vocabularies present (a
  random permutation of them first), 25-30 source and 24-29 target words a sentence; no
  validation sentences (the run's final evaluation then compiles nothing); 8 test pairs."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for lang, prefix, vocab, lo in (("en", "s", shape["src_vocab"], 25),
                                  ("fr", "t", shape["tgt_vocab"], 24)):
    lengths = rng.integers(lo, lo + 6, pairs)
    words = np.concatenate([rng.permutation(vocab),
                            rng.integers(0, vocab, max(int(lengths.sum()) - vocab, 0))])
    ends = np.cumsum(lengths)
    with open(os.path.join(folder, f"train.{lang}"), "w") as f:
      for end, n in zip(ends, lengths):
        f.write(" ".join(f"{prefix}{w}" for w in words[end - n:end]) + "\n")
    with open(os.path.join(folder, f"valid.{lang}"), "w"):
      pass
    with open(os.path.join(folder, f"test.{lang}"), "w") as f:
      f.write("".join(f"{prefix}1 {prefix}2 {prefix}3\n" for _ in range(8)))


def train_flags(args, corpus: str, workdir: str) -> list[str]:
  shape = sizes(args)
  flags = {"workdir": workdir, "data.source": "text", "data.path": corpus,
           "data.tokenizer": "none", "data.prepared_dir": os.path.join(args.work, "store"),
           "model.compute_dtype": args.dtype, "train.num_steps": args.steps,
           "train.log_every": args.log_every, "train.eval_every": 0,
           "train.checkpoint_every": 0}
  if args.tiny:
    flags.update({"model.num_layers": shape["layers"], "model.hidden_size": shape["hidden"],
                  "model.embed_size": shape["hidden"], "train.batch_size": shape["batch"],
                  "data.src_vocab_size": shape["src_vocab"],
                  "data.tgt_vocab_size": shape["tgt_vocab"]})
  return [f"--{k}={v}" for k, v in flags.items()]


def train_report(workdir: str, log: str) -> dict:
  """Words/s of the records after the first, the padding and the time to the first step."""
  records = []
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
  rates = [r["words_per_s"] for r in records if r.get("kind") == "train"][1:]
  with open(log) as f:
    text = f.read()
  padding = re.findall(r"padding fraction ([0-9.]+)", text)
  first = re.findall(r"first step done ([0-9.]+) s after start", text)
  vocab = re.findall(r"vocab (\d+) source, (\d+) target", text)
  params = re.findall(r"model: (\d+) parameters", text)
  return {"words_per_s": statistics.median(rates) if rates else None,
          "words_per_s_min": min(rates, default=None),
          "words_per_s_max": max(rates, default=None),
          "intervals": len(rates), "padding_fraction": float(padding[-1]) if padding else None,
          "seconds_to_first_step": float(first[-1]) if first else None,
          "vocab": [int(v) for v in vocab[-1]] if vocab else None,
          "parameters": int(params[-1]) if params else None}


def train_main(args) -> int:
  corpus = os.path.join(args.work, "corpus")
  if not os.path.exists(os.path.join(corpus, "test.fr")):
    write_corpus(corpus, sizes(args), args.pairs)
  workdir = os.path.join(args.work, f"train_{args.dtype}")
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
  log = os.path.join(args.work, f"train_{args.dtype}.log")
  cmd = [sys.executable, "-m", "experiments.wmt14", *train_flags(args, corpus, workdir)]
  print(" ".join(cmd), flush=True)
  t0 = time.perf_counter()
  with open(log, "w") as f:
    try:  # past the limit it is killed; the records written until then are still reported
      status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=args.limit).returncode
    except subprocess.TimeoutExpired:
      status = -9
  result = {"command": cmd, "status": status, "seconds": time.perf_counter() - t0,
            "dtype": args.dtype, **train_report(workdir, log)}
  with open(os.path.join(args.out, f"train_{args.dtype}.json"), "w") as f:
    json.dump(result, f, indent=1)
  wps = result["words_per_s"]
  print(f"{'paper preset' if not args.tiny else 'tiny model'}, {args.dtype}: "
        + (f"{wps:,.0f} words/s (median of {result['intervals']} intervals of "
           f"{args.log_every} steps, {result['words_per_s_min']:,.0f} to "
           f"{result['words_per_s_max']:,.0f}); " if wps else "no steady interval; ")
        + f"padding {result['padding_fraction']}, vocabularies {result['vocab']}, "
        f"{result['parameters']} parameters, first step after {result['seconds_to_first_step']} "
        f"s, exit status {status} after {result['seconds']:.0f} s (log: {log})", flush=True)
  if status != 0:
    with open(log) as f:
      print("the command's last lines:\n" + "".join(f.readlines()[-25:]), flush=True)
  return status


# ----------------------------------------------------------------------------- lstm


def to_cudnn(layers: list[dict]):
  """Our stack's weights as cuDNN's flat vector: per layer W_ih (G x I) and W_hh (G x H), then
  per layer b_ih and b_hh (ours has one bias: b_hh is zero). Same gate order (i, f, g, o)."""
  import jax.numpy as jnp
  weights = [w for p in layers for w in (p["w_x"].T.ravel(), p["w_h"].T.ravel())]
  biases = [b for p in layers for b in (p["b"], jnp.zeros_like(p["b"]))]
  return jnp.concatenate(weights + biases)


def median_ms(fn, *args, reps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def lstm_main(args) -> int:
  import jax
  import jax.numpy as jnp

  from s2s_jax import lstm
  try:
    from jax.experimental import rnn
  except ImportError as e:  # reported as each cuDNN row's error; ours are still timed
    rnn, missing = None, e
  shape = sizes(args)
  n, h, b, t = shape["layers"], shape["hidden"], shape["batch"], shape["length"]
  on_gpu = jax.default_backend() == "gpu"
  key = jax.random.PRNGKey(0)
  layers = lstm.init_stack(key, n, h, h, 0.08)
  x_TxBxI = jax.random.uniform(jax.random.PRNGKey(1), (t, b, h), jnp.float32, -1, 1)
  ct_TxBxH = jax.random.normal(jax.random.PRNGKey(2), (t, b, h), jnp.float32)
  mask_TxB = jnp.ones((t, b), jnp.float32)
  flat = to_cudnn(layers)
  seq_lengths = jnp.full((b,), t, jnp.int32)

  def ours(layers, x_TxBxI, dtype):
    zero = lstm.zero_state(n, b, h)
    return lstm.stack(layers, x_TxBxI, mask_TxB, zero, dtype)[0]

  def theirs(flat, x_TxBxI, dtype):
    if rnn is None:
      raise missing
    dtype = dtype or jnp.float32
    x = jnp.swapaxes(x_TxBxI, 0, 1).astype(dtype)
    h0 = jnp.zeros((n, b, h), dtype)
    if on_gpu:
      y = rnn.lstm(x, h0, h0, flat.astype(dtype), seq_lengths, input_size=h, hidden_size=h,
                   num_layers=n, dropout=0.0, bidirectional=False)[0]
    else:  # the rehearsal on a CPU: the reference implementation stands in for cuDNN
      w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(flat.astype(dtype), h, h, n, False)
      y = rnn.lstm_ref(x, h0, h0, w_ih, w_hh, b_ih, b_hh, seq_lengths, h, h, n, 0.0, False)[0]
    return jnp.swapaxes(y, 0, 1).astype(jnp.float32)

  def forward_backward(fn, dtype):
    loss = lambda w, x: jnp.sum(fn(w, x, dtype) * ct_TxBxH)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  rows, notes = [], []
  y_ours = jax.jit(lambda w, x: ours(w, x, None))(layers, x_TxBxI)
  try:
    y_theirs = jax.jit(lambda w, x: theirs(w, x, None))(flat, x_TxBxI)
    diff = float(jnp.max(jnp.abs(y_ours - y_theirs)))
    notes.append(f"same outputs: max |ours - cuDNN| = {diff:.2e} (float32, |y| <= 1)")
  except Exception as e:  # noqa: BLE001 -- reported, the timings of ours still run
    notes.append(f"cuDNN LSTM failed: {type(e).__name__}: {str(e).splitlines()[0]}")
  name = "cuDNN (jax.experimental.rnn.lstm)" if on_gpu else "lstm_ref (cuDNN's stand-in on CPU)"
  for dtype_name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
    for label, fn, weights in (("ours: lstm.stack (scan)", ours, layers), (name, theirs, flat)):
      row = {"dtype": dtype_name, "impl": label}
      try:
        row["forward_ms"] = median_ms(jax.jit(lambda w, x: fn(w, x, dtype)), weights, x_TxBxI,
                                      reps=args.reps)
        row["forward_backward_ms"] = median_ms(forward_backward(fn, dtype), weights, x_TxBxI,
                                               reps=args.reps)
      except Exception as e:  # noqa: BLE001 -- e.g. a dtype cuDNN's RNN does not take
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  with open(os.path.join(args.out, "lstm.json"), "w") as f:
    json.dump({"shape": shape, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "rows": rows, "notes": notes}, f, indent=1)
  print(f"LSTM stack: {n} layers of {h}, input {h}, batch {b}, {t} steps; jax {jax.__version__} "
        f"on {jax.devices()[0].device_kind}; median of {args.reps}")
  print(f"{'dtype':<9} {'implementation':<36} {'forward ms':>11} {'fwd+bwd ms':>11}")
  for r in rows:
    if "error" in r:
      print(f"{r['dtype']:<9} {r['impl']:<36} not run: {r['error']}")
    else:
      print(f"{r['dtype']:<9} {r['impl']:<36} {r['forward_ms']:>11.2f} "
            f"{r['forward_backward_ms']:>11.2f}")
  for dtype_name in ("float32", "bfloat16"):
    pair = [r for r in rows if r["dtype"] == dtype_name and "error" not in r]
    if len(pair) == 2:
      ratio = lambda key: pair[0][key] / pair[1][key]
      print(f"{dtype_name}: ours / cuDNN time, forward {ratio('forward_ms'):.2f}, forward + "
            f"backward {ratio('forward_backward_ms'):.2f}")
  print("\n".join(notes))
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
  p.add_argument("task", choices=("train", "lstm"))
  p.add_argument("--out", default="runs/gpu", help="folder for the results")
  p.add_argument("--work", default="", help="folder for the corpus, its store and the runs "
                 "(default: OUT/work)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="train: model.compute_dtype")
  p.add_argument("--steps", type=int, default=0, help="train: steps (0 = 60, tiny 20)")
  p.add_argument("--log-every", type=int, default=0, help="train: steps a record (0 = 10, tiny 5)")
  p.add_argument("--pairs", type=int, default=20_000, help="train: pairs of the corpus")
  p.add_argument("--limit", type=float, default=None,
                 help="train: seconds after which the training command is killed")
  p.add_argument("--reps", type=int, default=20, help="lstm: timed runs of each")
  p.add_argument("--tiny", action="store_true", help="tiny sizes (the rehearsal)")
  p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (the rehearsal)")
  args = p.parse_args(argv)
  args.steps = args.steps or (20 if args.tiny else 60)
  args.log_every = args.log_every or (5 if args.tiny else 10)
  args.work = args.work or os.path.join(args.out, "work")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.work, exist_ok=True)
  if not args.allow_cpu:  # asked in another process: JAX takes most of the GPU's memory
    backend = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                             capture_output=True, text=True).stdout.strip()
    if backend != "gpu":
      print(f"benchmarks.gpu: JAX runs on {backend or 'nothing'}, not a GPU (--allow-cpu to "
            "rehearse)", file=sys.stderr)
      return 2
  return train_main(args) if args.task == "train" else lstm_main(args)


if __name__ == "__main__":
  sys.exit(main())
