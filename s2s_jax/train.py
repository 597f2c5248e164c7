"""Training: the jitted train and eval steps, and the host loop around them.

The host loop owns everything impure: data, devices, checkpoints, signals, logging.
Metrics go to WORKDIR/metrics.jsonl, one JSON object per line ("train" lines every
train.log_every steps, "valid" lines every train.eval_every steps and at the end).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2s_jax import checkpoint
from s2s_jax import config as config_lib
from s2s_jax import model
from s2s_jax import workdir as workdir_lib
from s2s_jax import parallel
from s2s_jax.config import Config, ModelConfig
from s2s_jax.data import pipeline
from s2s_jax.data import sources
from s2s_jax.data.vocab import PAD_ID

METRICS_FILE = "metrics.jsonl"  # in the WORKDIR: one JSON object per line
TENSORBOARD_DIR = "tensorboard"  # in the WORKDIR: TensorBoard event files of the same metrics

TrainState = dict[str, Any]  # {"params", "opt_state", "step", "rng"}


def init_state(cfg: Config, tx: optax.GradientTransformation, src_vocab: int,
               tgt_vocab: int) -> TrainState:
  key = jax.random.PRNGKey(cfg.train.seed)
  k_init, k_rest = jax.random.split(key)
  params = model.init_params(k_init, cfg.model, src_vocab, tgt_vocab)
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": k_rest}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               tx: optax.GradientTransformation, loss_fn: Callable = model.loss_fn,
               reduce: Callable | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the paper's loss. A non-finite loss or gradient leaves the state as it was.

  `loss_fn` and `reduce` come from `parallel.loss_and_reduce`: a vocabulary-sharded loss, or
  under pmap each device's share of the loss and a psum of (loss, aux, grads) over devices.
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, cfg)
  if reduce is not None:
    loss, aux, grads = reduce((loss, aux, grads))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {"params": keep(params, state["params"]),
               "opt_state": keep(opt_state, state["opt_state"]),
               "step": state["step"] + 1,
               "rng": state["rng"]}
  metrics = {"loss": loss, "nll_sum": aux["nll_sum"], "num_tokens": aux["num_tokens"],
             "grad_norm": grad_norm, "finite": finite}
  return new_state, metrics


def eval_step(params: model.Params, batch: dict[str, jax.Array], *, cfg: ModelConfig,
              loss_fn: Callable = model.loss_fn) -> dict[str, jax.Array]:
  _, aux = loss_fn(params, batch, cfg)
  return {"nll_sum": aux["nll_sum"], "num_tokens": aux["num_tokens"]}


def make_steps(cfg: Config, tx: optax.GradientTransformation,
               layout: parallel.Layout | None = None) -> tuple[Callable, Callable]:
  """Jitted (train_step, eval_step); the train state is donated.

  Without `layout`: plain jit on the default device. With one (`parallel.make_layout`): the
  strategy it names (mesh, pmap or layers) on its devices; the steps then take the state placed by
  `parallel.place_state` and global host batches.
  """
  if layout is None:
    train = jax.jit(functools.partial(train_step, cfg=cfg.model, tx=tx), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, cfg=cfg.model))
    return train, evaluate
  parallel.check_optimizer(layout, cfg.optim)
  loss, reduce = parallel.loss_and_reduce(layout)
  return parallel.compile_steps(
      layout, functools.partial(train_step, cfg=cfg.model, tx=tx, loss_fn=loss, reduce=reduce),
      functools.partial(eval_step, cfg=cfg.model, loss_fn=loss))


def perplexity(eval_fn: Callable, params: model.Params,
               batches: Iterable[dict[str, np.ndarray]]) -> tuple[float, float]:
  """(mean NLL per target token including </s>, its exp) over all batches."""
  nll, tokens = 0.0, 0
  outs = [eval_fn(params, b) for b in batches]
  for o in jax.device_get(outs):
    nll += float(o["nll_sum"])
    tokens += int(o["num_tokens"])
  mean = nll / max(tokens, 1)
  return mean, math.exp(min(mean, 700.0))


def count_words(batch: dict[str, np.ndarray]) -> int:
  """Source + target words as the paper counts them (</s> not counted)."""
  src = int(np.sum(batch["src"] != PAD_ID))
  tgt = int(np.sum(batch["tgt"] != PAD_ID)) - int(np.sum(np.any(batch["tgt"] != PAD_ID, axis=1)))
  return src + tgt


class MetricsWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl and writes the same numbers as
  TensorBoard scalars (tag "<kind>/<field>") to event files in WORKDIR/tensorboard.

  `resume_step`: the restored checkpoint's step (None: a fresh start). TensorBoard then hides
  every event logged after it by an earlier, interrupted run (its purge_step), as
  `workdir.rewind_metrics` drops those lines from metrics.jsonl.
  """

  def __init__(self, workdir: str, active: bool = True, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self.active = active  # False on every process but the first of a multi-host run
    self._purge_step = 0 if resume_step is None else resume_step + 1
    self._tb = None

  def write(self, record: dict[str, Any]) -> None:
    if not self.active:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tb is None:
      import tensorboardX
      self._tb = tensorboardX.SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step,
                                            flush_secs=30)
    kind = record.get("kind", "metrics")
    for key, value in record.items():
      if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(f"{kind}/{key}", value, int(record["step"]))
    self._tb.flush()  # records come every train.log_every steps: cheap, and nothing is lost

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class StopSignal:
  """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:  # a second Ctrl-C: give up at once
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("signal %d received: saving a checkpoint, then exiting", signum)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    return False


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
  if cfg.train.num_steps > 0:
    return cfg.train.num_steps
  return int(math.ceil(cfg.train.num_epochs * steps_per_epoch))


# x86 instructions that XLA's CPU dots use for bfloat16 operands (AVX512-BF16 dot products, AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
COMPUTE_DTYPES = (*model.OPERAND_DTYPES, "auto")  # model.compute_dtype's values


def native_bf16_dtype(backend: str | None = None,
                      cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
  """The matmul dtype `model.compute_dtype=auto` picks on this machine, and why (for the log).

  bfloat16 on accelerators and on x86 CPUs with bf16 dot-product instructions (on a Zen 4 with
  AVX512-BF16 the quickstart trains ~1.7x faster than in float32); float32 on every other CPU,
  where XLA widens bf16 operands in software (a quickstart step 1.45x slower than float32 on a
  Zen 1, see BENCHMARKS.md). CPUs other than x86 Linux were not measured: float32.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "bfloat16", f"{backend} backend"
  try:
    with open(cpuinfo) as f:
      flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
  except OSError:
    return "float32", f"CPU, {cpuinfo} unreadable"
  found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
  if found:
    return "bfloat16", f"CPU with {' and '.join(found)}"
  return "float32", f"CPU without {' or '.join(BF16_CPU_FLAGS)}: bfloat16 would be widened in software"


def resolve_compute_dtype(cfg: Config, workdir: str) -> Config:
  """Checks model.compute_dtype and turns `auto` into float32 or bfloat16.

  A resumed run keeps the dtype it started with (WORKDIR/config.json), so that its resume stays
  bit-exact on another machine; a new run takes `native_bf16_dtype()`. The resolved value is
  what config.json records.
  """
  name = cfg.model.compute_dtype
  if name not in COMPUTE_DTYPES:
    raise config_lib.ConfigError(
        f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
  if name != "auto":
    return cfg
  saved_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  saved = (config_lib.load_json(saved_path).model.compute_dtype
           if os.path.exists(saved_path) else "auto")
  if saved in model.OPERAND_DTYPES:
    dtype, why = saved, f"as the run started, {saved_path}"
  else:
    dtype, why = native_bf16_dtype()
  logging.info("model.compute_dtype=auto: %s (%s)", dtype, why)
  return config_lib.override(cfg, {"model.compute_dtype": dtype})


def train(cfg: Config, workdir: str, progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`. Returns the final metrics."""
  t_start = time.perf_counter()
  parallel.initialize(cfg.parallel)  # multi-host: before anything touches a device
  cfg = resolve_compute_dtype(cfg, workdir)
  layout = parallel.make_layout(cfg.parallel, {"train.batch_size": cfg.train.batch_size,
                                               "train.eval_batch_size": cfg.train.eval_batch_size},
                                num_layers=cfg.model.num_layers)
  main_process = parallel.is_main_process()
  if not main_process:  # logging, progress bar and metrics on process 0 only
    logging.getLogger().setLevel(logging.WARNING)
    progress = False
  logging.info("devices: %s strategy, mesh %s, %d process(es)", layout.strategy,
               dict(layout.mesh.shape), jax.process_count())
  # Process 0 writes the WORKDIR files first; the others then read what it wrote.
  # check_config refuses a config that differs from the saved one.
  parallel.main_process_first(lambda: workdir_lib.check_config(cfg, workdir))
  corpus = parallel.main_process_first(
      lambda: pipeline.load_corpus(cfg.data, workdir, progress=progress))
  batches = pipeline.BatchIterator(corpus.examples["train"], cfg.train.batch_size,
                                   cfg.data.bucket_width, cfg.train.seed, cfg.data.bucket_growth,
                                   rows=parallel.host_rows(layout, cfg.train.batch_size))
  valid = corpus.examples["valid"]
  if cfg.data.max_eval_sentences > 0:
    valid = valid[:cfg.data.max_eval_sentences]
  valid_rows = parallel.host_rows(layout, cfg.train.eval_batch_size)
  valid_batches = lambda: pipeline.eval_batches(valid, cfg.train.eval_batch_size,
                                                cfg.data.bucket_width, cfg.data.bucket_growth,
                                                valid_rows)
  steps_per_epoch = batches.batches_per_epoch
  num_steps = total_steps(cfg, steps_per_epoch)

  from s2s_jax import optim
  tx, schedule = optim.make_optimizer(cfg.optim, steps_per_epoch)
  state = parallel.place_state(layout, init_state(cfg, tx, len(corpus.src_vocab),
                                                  len(corpus.tgt_vocab)))
  logging.info("model: %d parameters; vocab %d source, %d target; %d steps (%.2f epochs of %d)",
               model.num_params(jax.eval_shape(lambda s: parallel.to_checkpoint(layout, s),
                                               state)["params"]),
               len(corpus.src_vocab), len(corpus.tgt_vocab),
               num_steps, num_steps / steps_per_epoch, steps_per_epoch)

  mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
  # Falls back past corrupted checkpoints. Checkpoints hold the canonical state
  # (parallel.to_checkpoint), whatever the layout.
  restored = checkpoint.restore_newest(mngr, parallel.to_checkpoint(layout, state))
  if restored is not None:
    state, data_state, latest = restored
    state = parallel.from_checkpoint(layout, state)
    try:
      batches.restore(data_state)
    except ValueError as e:  # the corpus is not the one the checkpoint was trained on
      where = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(latest))
      raise sources.DataError(f"{where}: {e}; resume with the original corpus, or use a new "
                              "--workdir") from None
    logging.info("resumed from checkpoint at step %d (epoch %d, batch %d)", latest,
                 batches.epoch, batches.index)

  train_fn, eval_fn = make_steps(cfg, tx, layout)
  step = start_step = int(state["step"])
  writer = MetricsWriter(workdir, active=main_process,
                         resume_step=step if restored is not None else None)
  result: dict[str, Any] = {"step": step}
  # Records past the restored step describe lost work: drop them, as if never interrupted.
  kept = parallel.main_process_first(
      lambda: workdir_lib.rewind_metrics(writer.path, step if restored is not None else -1))
  evaluated = {r["step"] for r in kept if r.get("kind") == "valid"}  # steps not to log again
  pending: list[tuple[dict, int]] = []
  words, t_last = 0, time.perf_counter()
  bad_streak = 0

  def log_train():
    nonlocal pending, words, t_last
    if not pending:
      return
    host = jax.device_get([m for m, _ in pending])
    skipped = sum(1 for m in host if not bool(m["finite"]))
    host = [m for m in host if bool(m["finite"])] or host  # skipped steps stay out of the means
    nll = sum(float(m["nll_sum"]) for m in host)
    toks = sum(int(m["num_tokens"]) for m in host)
    now = time.perf_counter()
    rec = {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
           "loss": float(np.mean([float(m["loss"]) for m in host])),
           "train_nll": nll / max(toks, 1), "train_ppl": math.exp(min(nll / max(toks, 1), 700.0)),
           "lr": float(schedule(step - 1)), "grad_norm": float(host[-1]["grad_norm"]),
           "words_per_s": words / max(now - t_last, 1e-9), "skipped_steps": skipped}
    writer.write(rec)
    result.update(rec)
    pending, words, t_last = [], 0, now
    if bar is not None:
      bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['train_ppl']:.2f}",
                      lr=f"{rec['lr']:.4g}", wps=f"{rec['words_per_s']:.0f}")

  def run_eval():
    _, ppl = perplexity(eval_fn, state["params"], valid_batches())
    if step not in evaluated:
      writer.write({"kind": "valid", "step": step, "valid_ppl": ppl})
      evaluated.add(step)
    result["valid_ppl"] = ppl
    logging.info("step %d: valid_ppl %.3f", step, ppl)

  def save():
    checkpoint.save(mngr, step, parallel.to_checkpoint(layout, state), batches.state())

  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
  def check_finite(metrics, at_step, position):
    nonlocal bad_streak
    if bool(metrics["finite"]):
      bad_streak = 0
      return
    bad_streak += 1
    logging.warning("step %d: non-finite loss or gradient; update skipped (epoch %d, batch %d)",
                    at_step, *position)
    if cfg.train.max_bad_steps > 0 and bad_streak >= cfg.train.max_bad_steps:
      mngr.wait_until_finished()
      writer.close()
      if bar is not None:
        bar.close()
      raise FloatingPointError(f"{bad_streak} consecutive non-finite steps ending at step {at_step}; "
                               "lower optim.learning_rate or check the data")

  if step == 0 and cfg.train.eval_every:
    run_eval()  # the curve starts at the initial parameters
  previous = None  # checked one step late so that the host never waits on the step it just queued
  with StopSignal() as stop:
    while step < num_steps and stop.received is None:
      position = (batches.epoch, batches.index)
      batch = next(batches)
      words += count_words(batch)
      state, metrics = train_fn(state, batch)
      step += 1
      if step == start_step + 1:  # data, initialization, compilation and one step
        jax.block_until_ready(metrics)
        result["seconds_to_first_step"] = time.perf_counter() - t_start
        logging.info("first step done %.1f s after start", result["seconds_to_first_step"])
      if previous is not None:
        check_finite(*previous)
      previous = (metrics, step, position)
      pending.append((metrics, step))
      if bar is not None:
        bar.update(1)
      if step % cfg.train.log_every == 0:
        log_train()
      if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        run_eval()
      if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
        save()
    if previous is not None:
      check_finite(*previous)
    log_train()
    if stop.received is None and (not cfg.train.eval_every or step % cfg.train.eval_every
                                  or step == start_step):  # (resumed at the end: report it)
      run_eval()
    if mngr.latest_step() != step:
      save()
    mngr.wait_until_finished()
  writer.close()
  if bar is not None:
    bar.close()
  if stop.received is not None:
    logging.warning("stopped by signal at step %d; checkpoint saved. Rerun the same command to resume.",
                    step)
  result["step"] = step
  result["interrupted"] = stop.received is not None
  return result


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_ENV = "S2S_JAX_MALLOC"  # =system: leave glibc's malloc settings alone


def reuse_host_memory() -> bool:
  """Makes glibc keep freed host memory for reuse. True if applied (Linux with glibc only).

  Every run of a jitted program on XLA's CPU backend allocates its temporaries as one block
  (128 MB for the small benchmark model's train step). glibc serves a block that large with a
  fresh mmap and unmaps it on free, so each step faults the whole block in again and the
  kernel zeroes it page by page: about a quarter of a small CPU train step. With one arena,
  no mmap for large blocks and no trimming, the block comes from the heap where the previous
  step left it. Call before JAX starts its backend: threads keep the arena they first used.
  """
  if os.environ.get(MALLOC_ENV, "") == "system" or sys.platform != "linux":
    return False
  try:
    import ctypes
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
              mallopt(_M_TRIM_THRESHOLD, -1)])  # -1: never trim (blocks can exceed 2 GiB)


CACHE_ENV = "S2S_JAX_COMPILATION_CACHE"  # a folder for compiled programs, or "off"


def compilation_cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
  """The folder where the command lines keep compiled programs; None when $S2S_JAX_COMPILATION_CACHE
  is "off". Default: $XDG_CACHE_HOME/s2s_jax/xla, or ~/.cache/s2s_jax/xla."""
  folder = environ.get(CACHE_ENV, "")
  if folder == "off":
    return None
  if folder:
    return folder
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "s2s_jax", "xla")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache in `compilation_cache_dir()`, unless one is
  already configured (JAX_COMPILATION_CACHE_DIR) or the folder cannot be made. Returns the
  folder in use, or None.

  A rerun (a resume, another training of the same shapes, decoding a trained model) then loads
  what XLA compiled before instead of compiling it again. On a 2-core CPU, 26 quickstart steps
  over its 8 padded lengths took 13 s instead of 35 s, and the whole short command 83 s instead
  of 115 s. A paper-size program takes tens of seconds to compile. JAX stores programs that took
  at least a second to compile. Call before the first compile.
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = compilation_cache_dir()
  if folder is None:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    logging.warning("no compilation cache: cannot create %s (%s)", folder, e)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def setup_cli() -> None:
  """Process setup shared by the command lines: host memory reuse, logging, then the
  compilation cache."""
  reuse_host_memory()
  setup_logging()
  enable_compilation_cache()


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr, force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


# Errors whose message already says what is wrong and what to do; `main` prints them as one line.
CLI_ERRORS = (config_lib.ConfigError, sources.DataError, checkpoint.CheckpointError,
              FileNotFoundError, FloatingPointError)


def main(preset: Config, argv: Sequence[str], after: Callable[[Config, str], None] | None = None) -> int:
  """Command line of the experiment presets: --workdir DIR and --section.field=value overrides;
  --prepare_data prepares the corpus (and the WORKDIR's vocabularies) and stops."""
  setup_cli()
  try:
    updates, extras = config_lib.parse_args(argv, extra_flags=("workdir", "prepare_data"))
    cfg = config_lib.override(preset, updates)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if "workdir" not in extras:
    print("error: --workdir DIR is required", file=sys.stderr)
    return 2
  workdir = extras["workdir"]
  try:
    if extras.get("prepare_data", "false").lower() in ("true", "1", "yes"):
      corpus = pipeline.load_corpus(cfg.data, workdir, progress=True)
      print(json.dumps({"prepared": corpus.prepared.folder, "stats": corpus.stats}))
      return 0
    result = train(cfg, workdir)
    if after is not None and not result.get("interrupted"):
      after(cfg, workdir)
  except CLI_ERRORS as e:  # the program's own diagnoses: one line, no traceback
    print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2 if isinstance(e, config_lib.ConfigError) else 1
  print(json.dumps({k: result[k] for k in ("step", "valid_ppl", "train_ppl") if k in result}))
  return 0
