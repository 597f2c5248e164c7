"""Benchmark s2s_jax against the PyTorch reference, side by side in one process.

  python -m benchmarks.compare --config tiny|small|medium|paper [--steps N] [--dtype both]
      [--skip-torch] [--beams 2,12] [--attention general [--input-feeding]] [--json FILE]

Measures, for the same model sizes, batch and initial weights:
  train   one step of s2s_jax.train.train_step (the jitted step from train.make_steps, the
          optimizer from s2s_jax.optim) vs torch_ref.Trainer.step; source+target tokens/s.
  greedy  s2s_jax.decode.greedy vs torch_ref.greedy, 50 steps at most; sentences/s.
  beamK   s2s_jax.decode.beam vs torch_ref.beam (the same search: same hypotheses, same
          steps), for each beam size K (--beams), 1-best, 50 steps at most; sentences/s.
Each row's ratio is over PyTorch's fastest variant of the same task. The `tiny` config is a
smoke test of the harness (seconds), not a measurement. --attention TYPE [--input-feeding]
measures the attention model instead (the PyTorch reference, torch_ref.AttentionSeq2Seq, has
its training step only: its decoding rows are named on `not run:` lines).
Timed repetitions of every variant are interleaved (ours f32, torch f32, ours bf16, torch bf16,
...) so that load from other processes hits all of them alike; each figure is a median. The
machine's matmul peak (f32 and bf16, JAX and torch, the best of each dtype) is measured in the
same run. A PyTorch variant that raises on this machine (its bf16 LSTM on a CPU without bf16
instructions) is left out and named on a `not run:` line under the table.
PyTorch runs on the device JAX computes on: the CPU, or with JAX on a GPU, CUDA (cuDNN's LSTM;
a torch build without CUDA is then an error unless --skip-torch). On a GPU, float32 products
use TF32 in both frameworks (JAX's default there) unless --f32-matmul highest, peak memory is
XLA's buffer assignment for ours and torch's allocator peak for PyTorch, and thread counts do
not apply.
The last line is `ratio train=X decode=Y beam2=Z ...`: per task (decode is greedy), our best
variant over PyTorch's best; the lines before it give the same ratios round by round (median,
quartiles), a measure of how much the machine's noise moves them.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

CONFIGS = {  # name: (layers, hidden = embed, source vocab, target vocab, batch, sentence length)
    "tiny": (1, 32, 50, 50, 4, 5),
    "small": (2, 256, 8_000, 8_000, 64, 20),
    "medium": (4, 512, 16_000, 16_000, 128, 30),
    "paper": (4, 1000, 160_000, 80_000, 128, 30),
}
DEFAULT_STEPS = {"tiny": 2, "small": 20, "medium": 8, "paper": 3}
DECODE_STEPS = 50  # the decoding cap (max_len) of both frameworks, every sentence


@dataclasses.dataclass(frozen=True)
class Shape:
  layers: int
  hidden: int
  src_vocab: int
  tgt_vocab: int
  batch: int
  length: int

  def lstm_flops(self) -> int:
    """Matmul FLOPs of one token through an L-layer LSTM (embed = hidden)."""
    return self.layers * 2 * 4 * self.hidden * 2 * self.hidden

  def softmax_flops(self) -> int:
    return 2 * self.hidden * self.tgt_vocab

  def train_flops(self) -> int:
    """Forward + backward (= 3x forward) matmul FLOPs of one train step."""
    s = t = self.length
    return 3 * self.batch * (s * self.lstm_flops() + t * (self.lstm_flops() + self.softmax_flops()))

  def decode_flops(self, steps: int, beam: int = 1) -> int:
    per_step = self.lstm_flops() + self.softmax_flops()
    return self.batch * (self.length * self.lstm_flops() + steps * beam * per_step)


# ---------------------------------------------------------------- timing and memory helpers

def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
  """Gives freed heap memory back to the OS so that RSS measures live memory."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


class PeakRss:
  """Samples this process's RSS every `interval` s; `.extra` = peak minus RSS at entry."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.extra = interval, 0

  def __enter__(self):
    time.sleep(0.1)  # XLA frees a run's temporaries just after its outputs are ready
    _trim_heap()
    self.base = self.peak = _rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.wait(self.interval):
      self.peak = max(self.peak, _rss_bytes())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())
    self.extra = self.peak - self.base
    return False


class CudaPeak:
  """torch's CUDA allocator: `.extra` = its peak during the block minus what it held at entry."""

  def __enter__(self):
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    self.base = torch.cuda.memory_allocated()
    return self

  def __exit__(self, *exc):
    import torch
    torch.cuda.synchronize()
    self.extra = torch.cuda.max_memory_allocated() - self.base
    return False


def xla_extra_bytes(stats) -> int:
  """Device memory a compiled XLA program needs beyond its arguments: temporaries plus outputs
  that do not reuse a donated argument (`Compiled.memory_analysis()`)."""
  return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


def torch_device(jax_backend: str, cuda_available: bool) -> str:
  """The torch device that matches where JAX computes (`jax.default_backend()`)."""
  if jax_backend == "cpu":
    return "cpu"
  if jax_backend not in ("gpu", "cuda"):
    raise SystemExit(f"benchmarks.compare: JAX computes on {jax_backend!r}; the PyTorch reference "
                     "runs on a CPU or a CUDA GPU only: pass --skip-torch")
  if not cuda_available:
    raise SystemExit("benchmarks.compare: JAX computes on a GPU but this PyTorch build has no "
                     "CUDA; install a CUDA build of torch, or pass --skip-torch")
  return "cuda"


@dataclasses.dataclass
class Variant:
  """One measured row: `run()` does the work once and returns when it is finished."""
  name: str  # e.g. "ours f32"
  task: str  # train | greedy | beam2 | ...
  framework: str  # ours | torch
  dtype: str  # float32 | bfloat16
  run: Callable[[], Any]
  flops: int
  units: float  # tokens (train) or sentences (decode) per run
  state_bytes: int = 0  # persistent memory the variant owns (params, optimizer state)
  times: list = dataclasses.field(default_factory=list)
  # measures step_extra_bytes around the last warm-up run; None: set when the variant was built
  meter: Callable[[], Any] | None = PeakRss
  step_extra_bytes: int = 0
  compile_s: float = 0.0
  note: str = ""

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def peak_mb(self) -> float:
    return (self.state_bytes + self.step_extra_bytes) / 2**20


def run_interleaved(variants: list[Variant], warmup: int, reps: int, log: Callable) -> None:
  """Warm-up (the last one under the variant's memory meter), then `reps` rounds over all
  variants."""
  for v in variants:
    for i in range(warmup):
      if i == warmup - 1 and v.meter is not None:
        with v.meter() as mem:
          v.run()
        v.step_extra_bytes = mem.extra
      else:
        v.run()
    log(f"  warmed up {v.task} {v.name}")
  for r in range(reps):
    for v in variants:
      t0 = time.perf_counter()
      v.run()
      v.times.append(time.perf_counter() - t0)
    log(f"  round {r + 1}/{reps}: " + ", ".join(f"{v.task} {v.name} {v.times[-1]*1e3:.0f} ms"
                                                 for v in variants))


# ---------------------------------------------------------------- matmul peak

def matmul_peak(n: int, reps: int, with_torch: bool, device: str = "cpu") -> dict[str, float]:
  """Best FLOP/s of an n x n x n matmul, per framework and dtype (torch on `device`)."""
  import jax
  import jax.numpy as jnp
  out = {}
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  cases = {"jax float32": (jax.jit(lambda x, y: x @ y), a),
           "jax bfloat16": (
               jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)),
               a.astype(jnp.bfloat16))}
  for name, (f, x) in cases.items():
    f(x, x).block_until_ready()
    best = min(_timed(lambda: f(x, x).block_until_ready()) for _ in range(reps))
    out[name] = 2 * n**3 / best
  if with_torch:
    import torch

    from benchmarks import torch_ref
    dev = torch.device(device)
    for dt in ("float32", "bfloat16"):
      # A CPU without bf16 instructions may run torch's bf16 product through a scalar fallback
      # (0.3 GFLOP/s seen on an AVX2-only Zen 3): a 512 probe first, the n product only if the
      # probe says it takes under a second.
      for m in (min(n, 512), n):
        t = torch.randn(m, m, device=dev).to(getattr(torch, dt))
        product = lambda: (t @ t, torch_ref.sync(dev))
        product()
        best = min(_timed(product) for _ in range(reps))
        if m == n or best * (n / m) ** 3 > 1.0:
          break
      out[f"torch {dt}"] = 2 * m**3 / best
  return out


def _timed(f: Callable) -> float:
  t0 = time.perf_counter()
  f()
  return time.perf_counter() - t0


# ---------------------------------------------------------------- the benchmark

def make_batch(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length sentences (no padding): ids >= 4, the target ending in </s>."""
  rng = np.random.default_rng(seed)
  src = rng.integers(4, shape.src_vocab, (shape.batch, shape.length), dtype=np.int32)
  tgt = rng.integers(4, shape.tgt_vocab, (shape.batch, shape.length), dtype=np.int32)
  tgt[:, -1] = 3  # EOS_ID
  return {"src": src, "tgt": tgt}


def model_config(shape: Shape, dtype: str = "float32", attention: str = "none",
                 input_feeding: bool = False):
  """The default Config (SGD, clip 5) at the benchmark's sizes, with `attention` (model.attention)
  and `input_feeding` (model.input_feeding)."""
  from s2s_jax import config as config_lib
  return config_lib.override(config_lib.Config(), {
      "model.num_layers": shape.layers, "model.hidden_size": shape.hidden,
      "model.embed_size": shape.hidden, "train.batch_size": shape.batch,
      "model.compute_dtype": dtype, "model.attention": attention,
      "model.input_feeding": input_feeding})


def tree_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def build(args, shape: Shape, log: Callable) -> tuple[list[Variant], list[Variant], dict]:
  """The train and decode variants of both frameworks, sharing one set of initial weights.

  Variants of one framework share their weights (ours: one train state, passed from step to
  step whatever the dtype; torch: one net for training, one for decoding), which keeps the
  paper configuration in memory; the time of an SGD step does not depend on the weights.
  `args.backend` is where JAX computes, `args.device` where PyTorch runs ("cpu" or "cuda", from
  `torch_device`).
  """
  import jax

  from s2s_jax import config as config_lib
  from s2s_jax import decode, model, optim, train

  cfg = model_config(shape, attention=args.attention, input_feeding=args.input_feeding)
  on_cpu = args.backend == "cpu"
  dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
  tx, _ = optim.make_optimizer(cfg.optim, steps_per_epoch=1000)
  batch_np = make_batch(shape)
  batch = jax.device_put(batch_np)
  tokens = float(np.sum(batch_np["src"] != 0) + np.sum(batch_np["tgt"] != 0))
  holder = {"state": train.init_state(cfg, tx, shape.src_vocab, shape.tgt_vocab)}
  params_host = jax.device_get(holder["state"].params)
  info: dict[str, Any] = {"params": model.num_params(params_host),
                          "words": train.count_words(batch_np)}
  dec_b = args.decode_batch
  src = batch["src"][:dec_b]
  dec_shape = dataclasses.replace(shape, batch=dec_b)
  # ours: RSS sampled on the CPU; on a device, XLA's buffer assignment (set below)
  ours_meter = PeakRss if on_cpu else None
  extra = lambda compiled: 0 if on_cpu else xla_extra_bytes(compiled.memory_analysis())

  train_vs, decode_vs = [], []
  outputs = {}  # (dtype, task): our first variant's (1-best ids BxT, steps), to check torch's
  if not args.skip_torch:
    import torch

    from benchmarks import torch_ref
    dev = torch.device(args.device)
    torch_meter = PeakRss if args.device == "cpu" else CudaPeak
    where = "" if args.device == "cpu" else f" {args.device}"  # CPU rows get a thread count later
    torch.manual_seed(0)
    src_t = torch.from_numpy(batch_np["src"]).long().to(dev)
    tgt_t = torch.from_numpy(batch_np["tgt"]).long().to(dev)

    def new_net(params_np):
      sizes = (shape.layers, shape.hidden, shape.hidden, shape.src_vocab, shape.tgt_vocab)
      net = (torch_ref.Seq2Seq(*sizes) if args.attention == "none" else torch_ref.AttentionSeq2Seq(
          *sizes, args.attention, args.input_feeding, cfg.model.attention_positions))
      net.load_params(params_np)
      return net.to(dev)  # on CUDA, nn.LSTM flattens its weights for cuDNN here

    # The same function in both frameworks: compare the initial losses in float32.
    train_net = new_net(params_host)
    with torch.no_grad():
      loss_t = float(train_net.loss(src_t, tgt_t))
    loss_j = float(jax.jit(lambda p, b: model.loss_fn(p, b, cfg.model)[0])(
        holder["state"].params, batch))
    info["check_loss"] = {"ours": loss_j, "torch": loss_t}
    log(f"check: initial float32 loss ours {loss_j:.6f} torch {loss_t:.6f} "
        f"(rel. diff {abs(loss_j - loss_t) / abs(loss_t):.1e})")
    torch_bytes = sum(p.numel() * p.element_size() for p in train_net.parameters())
    if "decode" in args.tasks:
      decode_net = new_net(params_host)
      src_dec_t = src_t[:dec_b]
  if "decode" in args.tasks:
    params = jax.device_put(params_host)  # decoding never changes it
  del params_host

  for dt in dtypes:
    short = "f32" if dt == "float32" else "bf16"
    kernels = args.kernels.split(",")
    cfgs = [(config_lib.override(cfg, {"model.compute_dtype": dt, "model.kernels": kern}),
             f"ours {short}" + (f" {kern}" if len(kernels) > 1 else "")) for kern in kernels]
    if "train" in args.tasks:
      for cfg_k, name in cfgs:
        step_fn, _ = train.make_steps(cfg_k, tx)
        t0 = time.perf_counter()
        compiled = step_fn.lower(holder["state"], batch).compile()
        compile_s = time.perf_counter() - t0

        def run_ours(compiled=compiled):
          holder["state"], metrics = compiled(holder["state"], batch)  # the state is donated
          jax.block_until_ready((holder["state"], metrics))

        train_vs.append(Variant(name, "train", "ours", dt, run_ours, shape.train_flops(),
                                tokens, state_bytes=tree_bytes(holder["state"]),
                                compile_s=compile_s, meter=ours_meter,
                                step_extra_bytes=extra(compiled)))
        log(f"  compiled {name} train in {compile_s:.1f} s")
      if not args.skip_torch:
        trainer = torch_ref.Trainer(train_net, cfg.optim.learning_rate, cfg.optim.clip_norm,
                                    bf16=dt == "bfloat16")
        step_t = lambda trainer=trainer: (trainer.step(src_t, tgt_t), torch_ref.sync(dev))
        if _torch_runs(f"torch {short} train", step_t, info, log)[0]:
          train_vs.append(Variant(f"torch {short}{where}", "train", "torch", dt, step_t,
                                  shape.train_flops(), tokens, state_bytes=torch_bytes,
                                  meter=torch_meter))
    if "decode" in args.tasks:
      searches = [("greedy", 1)] + [(f"beam{k}", k) for k in args.beams]
      for cfg_k, name in cfgs:
        kw = dict(cfg=cfg_k.model, max_len=DECODE_STEPS)  # caps: max_len for every sentence
        for task, k in searches:
          search, skw = ((decode.greedy, kw) if k == 1
                         else (decode.beam, dict(kw, beam_size=k, nbest=1)))
          t0 = time.perf_counter()
          compiled = search.lower(params, src, **skw).compile()
          compile_s = time.perf_counter() - t0
          run = lambda compiled=compiled: jax.block_until_ready(compiled(params, src))
          out = run()
          tok_BxT = np.asarray(out[0] if k == 1 else out.tokens_BxNxT[:, 0])
          # greedy: the longest output; beam: the search's own count (it stops once no live
          # hypothesis can win)
          steps = int(np.max(np.sum(tok_BxT != 0, axis=-1)) if k == 1 else out.steps)
          outputs.setdefault((dt, task), (tok_BxT, steps))
          decode_vs.append(Variant(name, task, "ours", dt, run, dec_shape.decode_flops(steps, k),
                                   dec_b, state_bytes=tree_bytes(params), compile_s=compile_s,
                                   note=f"{steps} steps", meter=ours_meter,
                                   step_extra_bytes=extra(compiled)))
      if not args.skip_torch:
        for task, k in searches:
          if args.attention != "none":
            info.setdefault("not_run", {})[f"torch {short} {task}"] = (
                "the PyTorch reference has no search for attention models")
            continue
          run_t = _torch_search(decode_net, src_dec_t, k, dt == "bfloat16", dev)
          ran, out = _torch_runs(f"torch {short} {task}", run_t, info, log)
          if not ran:
            continue
          tok_t = (out[0] if k == 1 else out.tokens_BxNxT[:, 0]).cpu().numpy()
          steps_t = int(np.max(np.sum(tok_t != 0, axis=-1)) if k == 1 else out.steps)
          if (dt, task) in outputs:
            tok, steps = outputs[dt, task]
            same = int(np.sum(np.all(tok_t == tok, axis=1)))
            info.setdefault("check_decode", {})[f"{short} {task}"] = [same, steps, steps_t]
            log(f"check: {short} {task} outputs identical for {same}/{dec_b} sentences, "
                f"steps ours {steps} torch {steps_t}")
          decode_vs.append(Variant(
              f"torch {short}{where}", task, "torch", dt, run_t, dec_shape.decode_flops(steps_t, k),
              dec_b, state_bytes=torch_bytes, note=f"{steps_t} steps", meter=torch_meter))
  return train_vs, decode_vs, info


def _torch_search(net, src_BxS, beam_size: int, bf16: bool, dev) -> Callable:
  """A run of torch_ref.greedy (beam_size 1) or torch_ref.beam (1-best) with our decoding's
  caps, finished on `dev`; it returns the search's result."""
  from benchmarks import torch_ref

  def run():
    if beam_size == 1:
      out = torch_ref.greedy(net, src_BxS, DECODE_STEPS, bf16)
    else:
      out = torch_ref.beam(net, src_BxS, beam_size=beam_size, nbest=1, max_len=DECODE_STEPS,
                           bf16=bf16)
    torch_ref.sync(dev)
    return out
  return run


def _torch_runs(name: str, fn: Callable, info: dict, log: Callable) -> tuple[bool, Any]:
  """Runs fn once: (True, its result), or (False, None) and the reason in info["not_run"]
  where torch cannot run it here.

  PyTorch's CPU LSTM under bf16 autocast needs oneDNN's bf16 LSTM, which an AVX2-only CPU
  lacks ("could not create a primitive descriptor for the LSTM forward propagation
  primitive"); the row is then left out and the report names it, instead of the run failing.
  """
  try:
    return True, fn()
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[0][:160]
    info.setdefault("not_run", {})[name] = reason
    log(f"  {name}: PyTorch cannot run it on this machine, left out ({reason})")
    return False, None


def with_torch_threads(variants: list[Variant], counts: list[int], auto: bool, log: Callable
                       ) -> list[Variant]:
  """Each torch variant once per thread count, or (auto) at the count that ran it fastest.

  On a machine whose cores are busy with other work, torch's OpenMP threads wait on each other
  (a 2-thread step can take 3-10x longer than a 1-thread one), so the count is part of
  measuring PyTorch at its best.
  """
  import torch
  out = []
  for v in variants:
    if v.framework != "torch":
      out.append(v)
      continue
    runs = {n: _with_threads(n, v.run) for n in counts}
    if auto and len(counts) > 1:
      runs[counts[0]]()  # warm-up
      best = min(counts, key=lambda n: _timed(runs[n]))
      log(f"  {v.task} {v.name}: {best} thread(s) ran fastest")
      counts_v = [best]
    else:
      counts_v = counts
    for n in counts_v:
      out.append(dataclasses.replace(v, name=f"{v.name} {n}t", run=runs[n], times=[]))
  torch.set_num_threads(counts[0])
  return out


def _with_threads(n: int, fn: Callable) -> Callable:
  """fn run with torch using n intra-op threads (set before every call: variants alternate)."""
  import torch

  def run():
    torch.set_num_threads(n)
    return fn()
  return run


# ---------------------------------------------------------------- report

def ratio_key(task: str) -> str:
  """The name of a task's ratio on the last line: train, decode (greedy), beamK."""
  return "decode" if task == "greedy" else task


def report(train_vs: list[Variant], decode_vs: list[Variant], peak: dict[str, float]
           ) -> tuple[list[str], dict[str, float]]:
  """The table rows (markdown) and, per task, the ratio of our best to PyTorch's best."""
  best_peak = {dt: max(v for k, v in peak.items() if k.endswith(dt))
               for dt in ("float32", "bfloat16")}
  lines = ["| task | variant | median ms | tokens/s or sent/s | GFLOP/s | % of peak "
           "| peak MB | ours/torch-best | note |",
           "|---|---|---|---|---|---|---|---|---|"]
  ratios = {}
  for group, unit in ((train_vs, "tok/s"), (decode_vs, "sent/s")):
    for task in dict.fromkeys(v.task for v in group):
      rows = [v for v in group if v.task == task]
      theirs = [v for v in rows if v.framework == "torch"]
      torch_rate = fastest(theirs).units / fastest(theirs).median if theirs else 0.0
      for v in rows:
        rate = v.units / v.median
        flops = v.flops / v.median
        ratio = f"{rate / torch_rate:.2f}" if torch_rate else ""
        compiled = f"compile {v.compile_s:.1f} s" if v.compile_s else ""
        note = ", ".join(x for x in (v.note, compiled) if x)
        lines.append(f"| {task} | {v.name} | {v.median*1e3:,.1f} | {rate:,.1f} {unit} "
                     f"| {flops/1e9:,.1f} | {100*flops/best_peak[v.dtype]:.1f} | {v.peak_mb:,.0f} "
                     f"| {ratio} | {note} |")
      ours = [v for v in rows if v.framework == "ours"]
      if torch_rate and ours:
        ratios[ratio_key(task)] = fastest(ours).units / fastest(ours).median / torch_rate
  return lines, ratios


def fastest(rows: list[Variant]) -> Variant:
  """The variant with the most work (units) per second, by its median time."""
  return max(rows, key=lambda v: v.units / v.median)


def paired_ratios(variants: list[Variant], task: str) -> list[float]:
  """Round by round, our fastest variant's speed over PyTorch's fastest (by median), for `task`.

  The variants of one round run back to back, so a slow stretch of the shared machine hits
  both sides of a pair; the spread of these ratios says how far the median ratio can be trusted.
  """
  rows = [v for v in variants if v.task == task]
  ours = [v for v in rows if v.framework == "ours"]
  theirs = [v for v in rows if v.framework == "torch"]
  if not ours or not theirs:
    return []
  a, b = fastest(ours), fastest(theirs)
  return [(a.units / ta) / (b.units / tb) for ta, tb in zip(a.times, b.times)]


def describe_spread(xs: list[float]) -> str:
  """'median 0.97, quartiles 0.93-1.01, 8/10 rounds below 1' for a list of ratios."""
  q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
  below = sum(x < 1 for x in xs)
  return (f"median {statistics.median(xs):.2f}, quartiles {q[0]:.2f}-{q[2]:.2f}, "
          f"{below}/{len(xs)} rounds below 1")


HUGEPAGES = "glibc.malloc.hugetlb=1"
# --malloc: system = glibc's defaults; hugepages = transparent huge pages for malloc (a 2 MB page
# replaces 512 faults); reuse = huge pages and hardware.reuse_host_memory(), what the command lines
# do. Both are process-wide, so both frameworks run under the same setting.
MALLOC_MODES = ("system", "hugepages", "reuse")


def _set_hugepages(on: bool, argv: list[str]) -> None:
  """glibc reads its malloc tunables at process start: re-executes this command with them set.

  Large per-step buffers (XLA's temporaries, logits, activations) are otherwise fresh mmaps that
  are faulted in page by page at every step.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if on == (HUGEPAGES in tunables) or platform.system() != "Linux":
    return
  if on:
    tunables = ":".join(t for t in (tunables, HUGEPAGES) if t)
  else:
    tunables = ":".join(t for t in tunables.split(":") if t and t != HUGEPAGES)
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.compare", *argv], env)


def _set_f32_matmul(mode: str, with_torch: bool) -> None:
  """float32 products on a GPU: "tf32" (JAX's default there; torch's matmuls and cuDNN are set
  to it) or "highest" (full float32 in both)."""
  import jax
  if mode == "highest":
    jax.config.update("jax_default_matmul_precision", "highest")
  if with_torch:
    import torch
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = mode == "tf32"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                              description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="small")
  p.add_argument("--steps", type=int, default=0,
                 help="timed train steps per variant (0 = by config)")
  p.add_argument("--warmup", type=int, default=0, help="untimed runs per variant (0 = 2, paper 1)")
  p.add_argument("--decode-reps", type=int, default=0,
                 help="timed decodes per variant (0 = by config)")
  p.add_argument("--dtype", choices=("both", "float32", "bfloat16"), default="both")
  p.add_argument("--tasks", default="train,decode", help="comma list of train, decode")
  p.add_argument("--kernels", default="auto",
                 help="comma list of model.kernels values to time (e.g. plain,cpu)")
  p.add_argument("--beams", default="2,12", help="beam sizes (decode.beam and torch_ref.beam)")
  p.add_argument("--attention", default="none",
                 choices=("none", "dot", "general", "concat", "location"),
                 help="the model with Luong's attention (model.attention; PyTorch: "
                      "torch_ref.AttentionSeq2Seq, training only)")
  p.add_argument("--input-feeding", action="store_true",
                 help="with --attention: model.input_feeding (the decoder runs step by step)")
  p.add_argument("--skip-torch", action="store_true", help="measure ours only")
  p.add_argument("--torch-threads", default="",
                 help="comma list of torch thread counts, each its own variant (default: all cores "
                      "and 1; on a busy machine 1 thread is often much faster); 'auto' = time each "
                      "count once and keep the fastest (the paper config's default)")
  p.add_argument("--decode-batch", type=int, default=0,
                 help="sentences per decode call (0 = the config's batch; paper 32)")
  p.add_argument("--peak-size", type=int, default=0,
                 help="n of the n x n x n peak matmul (0 = 2048 on a CPU, 8192 on a GPU, tiny 256)")
  p.add_argument("--f32-matmul", choices=("tf32", "highest"), default="tf32",
                 help="GPU only: float32 products in TF32 (JAX's default there; torch is set to "
                      "match) or in full float32 in both frameworks")
  p.add_argument("--cache-dir", default=None,
                 help="JAX compilation cache folder ('off' = none; default: the command lines' "
                      "cache, cli.enable_compilation_cache())")
  p.add_argument("--json", default="", help="also write the results to this file")
  p.add_argument("--malloc", choices=MALLOC_MODES, default="reuse",
                 help="glibc malloc settings for both frameworks (see MALLOC_MODES; huge pages "
                      "restart the process once to set them)")
  args = p.parse_args(argv)
  _set_hugepages(args.malloc != "system", sys.argv[1:] if argv is None else list(argv))
  if args.malloc == "reuse":
    from s2s_jax import hardware
    hardware.reuse_host_memory()  # before JAX or torch start their threads
  args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  args.beams = [int(k) for k in args.beams.split(",") if k.strip()]
  threads = args.torch_threads or ("auto" if args.config == "paper" else "")
  args.auto_threads = threads == "auto"
  args.torch_threads = list(dict.fromkeys(
      int(n) for n in (f"{os.cpu_count()},1" if threads in ("", "auto") else threads).split(",")
      if n.strip()))
  shape = Shape(*CONFIGS[args.config])
  steps = args.steps or DEFAULT_STEPS[args.config]
  warmup = args.warmup or (1 if args.config == "paper" else 2)
  decode_reps = args.decode_reps or min(steps, 3)
  args.decode_batch = min(args.decode_batch or (32 if args.config == "paper" else shape.batch),
                          shape.batch)

  # With JAX on a GPU, both frameworks share it: JAX takes 45% of its memory, not 75%.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  import jax

  from s2s_jax import cli
  if args.cache_dir is None:
    cli.enable_compilation_cache()
  elif args.cache_dir not in ("", "off"):
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  t_start = time.perf_counter()
  load0 = os.getloadavg()[0]
  log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr,
                          flush=True)

  args.backend = backend = jax.default_backend()
  args.device = "none"
  if not args.skip_torch:
    import torch
    args.device = torch_device(backend, torch.cuda.is_available())
  if backend != "cpu":
    _set_f32_matmul(args.f32_matmul, not args.skip_torch)
  args.peak_size = args.peak_size or (256 if args.config == "tiny" else 2048 if backend == "cpu"
                                      else 8192)
  log(f"config {args.config}: {shape}; {steps} timed steps; jax {jax.__version__} "
      f"on {jax.devices()[0].device_kind}, {os.cpu_count()} cores; torch on {args.device}")
  peak = matmul_peak(args.peak_size, 5, not args.skip_torch, args.device)
  log("matmul peak: " + ", ".join(f"{k} {v/1e12:.3f} TFLOP/s" for k, v in peak.items()))
  train_vs, decode_vs, info = build(args, shape, log)
  log(f"model: {info['params']:,} parameters")
  if not args.skip_torch and args.device == "cpu":  # thread counts matter on the CPU only
    train_vs = with_torch_threads(train_vs, args.torch_threads, args.auto_threads, log)
    decode_vs = with_torch_threads(decode_vs, args.torch_threads, args.auto_threads, log)
  if train_vs:
    log("train:")
    run_interleaved(train_vs, warmup, steps, log)
  if decode_vs:
    log("decode:")
    run_interleaved(decode_vs, 1, decode_reps, log)
  again = matmul_peak(args.peak_size, 5, not args.skip_torch, args.device)
  peak = {k: max(v, again[k]) for k, v in peak.items()}  # the best of start and end
  lines, ratios = report(train_vs, decode_vs, peak)

  versions = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
  if not args.skip_torch and args.device == "cpu":
    versions += (f", torch {torch.__version__} (threads: {', '.join(map(str, args.torch_threads))}"
                 f"{', fastest kept' if args.auto_threads else ''})")
  elif not args.skip_torch:
    versions += (f", torch {torch.__version__} on {torch.cuda.get_device_name()} (cuDNN "
                 f"{torch.backends.cudnn.version()}); float32 products: {args.f32_matmul}")
  model_name = ("" if args.attention == "none" else f", attention {args.attention}"
                + (" + input feeding" if args.input_feeding else ""))
  print(f"config {args.config} (L={shape.layers}, H=E={shape.hidden}, V={shape.src_vocab}/"
        f"{shape.tgt_vocab}, batch {shape.batch} (decode {args.decode_batch}), "
        f"length {shape.length}{model_name}); "
        f"{versions}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
  print(f"malloc: {args.malloc}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
        "(same for both frameworks)")
  print("matmul peak TFLOP/s: " + ", ".join(f"{k} {v/1e12:.3f}" for k, v in peak.items()))
  print(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} "
        f"(other processes share these cores: compare within this run only)")
  if "check_loss" in info:
    c = info["check_loss"]
    print(f"same function: initial float32 loss ours {c['ours']:.6f}, torch {c['torch']:.6f}")
  for task, (same, steps, steps_t) in info.get("check_decode", {}).items():
    print(f"same search: {task} outputs identical for {same}/{args.decode_batch} sentences, "
          f"steps ours {steps}, torch {steps_t}")
  print("\n".join(lines))
  for framework in ("ours", "torch"):
    rows = [v for v in train_vs if v.framework == framework]
    if rows:
      best = fastest(rows)
      print(f"train words/s as the paper counts them (source + target, </s> left out), {framework}"
            f" fastest ({best.name}): {info['words'] / best.median:,.0f}")
  for name, reason in info.get("not_run", {}).items():
    print(f"not run: {name} (PyTorch raised: {reason})")
  tasks = dict.fromkeys(v.task for v in train_vs + decode_vs)
  paired = {ratio_key(task): paired_ratios(train_vs + decode_vs, task) for task in tasks}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "shape": dataclasses.asdict(shape), "peak": peak,
                 "info": info,
                 "ratios": ratios,
                 "paired": paired,
                 "rows": [
                     {"task": v.task, "variant": v.name, "times": v.times, "units": v.units,
                      "flops": v.flops, "peak_mb": v.peak_mb,
                      "compile_s": v.compile_s, "note": v.note} for v in train_vs + decode_vs]},
                f, indent=1)
  for key, xs in paired.items():
    if xs:
      print(f"paired {key} ratio per round (ours/torch, fastest variants): {describe_spread(xs)}")
  beams = " ".join(f"{k}={r:.2f}" for k, r in ratios.items() if k.startswith("beam"))
  print(f"ratio train={ratios.get('train', float('nan')):.2f} "
        f"decode={ratios.get('decode', float('nan')):.2f}" + (f" {beams}" if beams else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
