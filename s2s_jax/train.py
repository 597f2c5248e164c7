"""Training: the jitted train and eval steps, and the loop that runs them.

`train(cfg, workdir)` trains (or resumes) one run. A `Trainer` sets the run up (devices,
corpus, batches, optimizer, state, the newest checkpoint), runs a short loop of train steps,
and calls its hooks: periodic actions added with `add_hook(fn, every=n)` that also run once
when the loop ends. The built-in ones log training metrics, evaluate validation perplexity
and write checkpoints; `train(..., hooks=...)` adds more. Teardown happens in `close`.

Metrics go to WORKDIR/metrics.jsonl ("train" records every train.log_every steps, "valid"
records every train.eval_every steps and at the end) and TensorBoard (see workdir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2s_jax import checkpoint, cli, decode, model, optim, parallel
from s2s_jax import config as config_lib
from s2s_jax import workdir as workdir_lib
from s2s_jax.config import Config, ModelConfig
from s2s_jax.data import pipeline, sources
from s2s_jax.data.vocab import PAD_ID
from s2s_jax.parallel import devices


class TrainState(NamedTuple):
  """What a train step updates; checkpoints hold it as a dict of the same fields."""
  params: model.Params
  opt_state: optax.OptState
  step: jax.Array  # int32 scalar: train steps taken, skipped non-finite ones included


def init_state(cfg: Config, tx: optax.GradientTransformation, src_vocab: int,
               tgt_vocab: int) -> TrainState:
  """The initial state. The parameters' key is the first half of PRNGKey(train.seed) split in
  two, as before the state lost its unused rng: a seed gives the model it always gave."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
  params = model.init_params(init_key, cfg.model, src_vocab, tgt_vocab)
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


DROPOUT_STREAM = 1  # the dropout keys: fold_in(fold_in(PRNGKey(train.seed), this), step)


def schedule_at(opt_state: optax.OptState, step: jax.Array) -> optax.OptState:
  """`opt_state` with the step count of its learning-rate schedule set to `step`.

  optax counts the updates it applied; the train state counts steps, skipped non-finite ones
  included. The schedule follows the steps, like the logged lr and the run length.
  """
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree_util.tree_map(
      lambda x: x._replace(count=step.astype(x.count.dtype)) if is_schedule(x) else x,
      opt_state, is_leaf=is_schedule)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               tx: optax.GradientTransformation, loss_fn: Callable = model.loss_fn,
               reduce: Callable = lambda tree: tree, seed: int = 0,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the paper's loss, at the learning rate of step `state.step`. A non-finite
  loss or gradient leaves the state as it was (but for the step count).

  `loss_fn` and `reduce` come from the parallel strategy: a vocabulary-sharded loss, or under
  pmap each device's share of the loss and a psum of (loss, aux, grads) over devices.
  With model.dropout > 0 the loss gets the step's dropout key, drawn from train.seed and the
  state's step (so a resumed run draws what it would have drawn); `label_smoothing`
  (optim.label_smoothing) goes to the loss too. With both off the step is the paper's.
  """
  switches = {}
  if cfg.dropout > 0:
    stream = jax.random.fold_in(jax.random.PRNGKey(seed), DROPOUT_STREAM)
    switches["rng"] = jax.random.fold_in(stream, state.step)
  if label_smoothing > 0:
    switches["label_smoothing"] = label_smoothing
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg,
                                                                 **switches)
  loss, aux, grads = reduce((loss, aux, grads))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, schedule_at(state.opt_state, state.step), state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                         state.step + 1)
  metrics = {"loss": loss, "nll_sum": aux["nll_sum"], "num_tokens": aux["num_tokens"],
             "grad_norm": grad_norm, "finite": finite}
  return new_state, metrics


def eval_step(params: model.Params, batch: dict[str, jax.Array], *, cfg: ModelConfig,
              loss_fn: Callable = model.loss_fn) -> dict[str, jax.Array]:
  _, aux = loss_fn(params, batch, cfg)
  return {"nll_sum": aux["nll_sum"], "num_tokens": aux["num_tokens"]}


def make_steps(cfg: Config, tx: optax.GradientTransformation,
               strategy: parallel.Strategy | None = None) -> tuple[Callable, Callable]:
  """Jitted (train_step, eval_step); the train state is donated.

  Without `strategy`: plain jit on the default device. With one (`parallel.make`): its loss
  and compiled steps, which take the state placed by `strategy.place` and global host batches.
  """
  switches = dict(seed=cfg.train.seed, label_smoothing=cfg.optim.label_smoothing)
  if strategy is None:
    train = jax.jit(functools.partial(train_step, cfg=cfg.model, tx=tx, **switches),
                    donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, cfg=cfg.model))
    return train, evaluate
  strategy.check_model(cfg.model, cfg.optim)
  strategy.check_optimizer(cfg.optim)
  return strategy.compile(
      functools.partial(train_step, cfg=cfg.model, tx=tx, loss_fn=strategy.loss,
                        reduce=strategy.reduce, **switches),
      functools.partial(eval_step, cfg=cfg.model, loss_fn=strategy.loss))


def count_words(batch: dict[str, np.ndarray]) -> int:
  """Source + target words as the paper counts them (</s> not counted)."""
  src = int(np.sum(batch["src"] != PAD_ID))
  tgt = int(np.sum(batch["tgt"] != PAD_ID)) - int(np.sum(np.any(batch["tgt"] != PAD_ID, axis=1)))
  return src + tgt


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
  if cfg.train.num_steps > 0:
    return cfg.train.num_steps
  return int(math.ceil(cfg.train.num_epochs * steps_per_epoch))


SYNC_EVERY = 50  # steps between the loop's host syncs when train.log_every is 0


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


HookFn = Callable[["Trainer"], None]


@dataclasses.dataclass
class Hook:
  """A periodic action of the loop."""
  fn: HookFn
  every: int  # steps between calls (0: never during the loop)
  at_start: bool = False  # also before the first step of a fresh run
  at_end: bool = True  # also once when the loop ends, unless it just ran at that step
  when_stopped: bool = True  # at_end applies to a run stopped by a signal too
  last_step: int | None = None  # the step it last ran at


class Trainer:
  """One training run in a WORKDIR: setup (here), the loop (`run`), hooks, teardown (`close`).

  The attributes hooks read: cfg, workdir, step, state, strategy, eval_fn, batches,
  steps_per_epoch, num_steps, writer, checkpoints, progress_bar, result (the metrics `train`
  returns) and, for the train records, `pending` (the metrics of the steps not yet logged) and
  `words` (their source + target words, the rows of every process).
  """

  def __init__(self, cfg: Config, workdir: str, progress: bool = True):
    self.t_start = time.perf_counter()
    parallel.initialize(cfg.parallel)  # multi-host: before anything touches a device
    cfg = workdir_lib.resolve_compute_dtype(cfg, workdir)
    self.cfg, self.workdir = cfg, workdir
    self.strategy = parallel.make(cfg.parallel, num_layers=cfg.model.num_layers, batch_sizes={
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size})
    self.strategy.check_model(cfg.model, cfg.optim)
    main_process = devices.is_main_process()
    if not main_process:  # logging, progress bar and metrics on process 0 only
      logging.getLogger().setLevel(logging.WARNING)
      progress = False
    logging.info("devices: %s strategy, mesh %s, %d process(es)", self.strategy.name,
                 dict(self.strategy.mesh.shape), jax.process_count())
    # Process 0 writes the WORKDIR files first; the others then read what it wrote.
    # check_config refuses a config that differs from the saved one.
    devices.main_process_first(lambda: workdir_lib.check_config(cfg, workdir))
    corpus = devices.main_process_first(
        lambda: pipeline.load_corpus(cfg.data, workdir, progress=progress))
    # Batches are made, counted (the words of every process's rows) and placed ahead.
    batches = pipeline.BatchIterator(
        corpus.examples["train"], cfg.train.batch_size, cfg.data.bucket_width, cfg.train.seed,
        cfg.data.bucket_growth, rows=self.strategy.host_rows(cfg.train.batch_size))
    self.batches = pipeline.Prefetcher(
        batches, lambda batch: (batches.last_words, self.strategy.place_batch(batch)))
    # Saved with the data position: a resume refuses another corpus, wherever it lies.
    self.corpus_id = {"corpus": corpus.content_key, "corpus_name": corpus.name}
    self.valid = corpus.examples["valid"]
    if cfg.data.max_eval_sentences > 0:
      self.valid = self.valid[:cfg.data.max_eval_sentences]
    self.steps_per_epoch = self.batches.batches_per_epoch
    self.num_steps = total_steps(cfg, self.steps_per_epoch)

    tx, self.schedule = optim.make_optimizer(cfg.optim, self.steps_per_epoch)
    self.state = self.strategy.place(init_state(cfg, tx, len(corpus.src_vocab),
                                                len(corpus.tgt_vocab)))
    canonical = jax.eval_shape(self.strategy.to_canonical, self.state)
    logging.info("model: %d parameters; vocab %d source, %d target; %d steps (%.2f epochs of %d)",
                 model.num_params(canonical.params), len(corpus.src_vocab),
                 len(corpus.tgt_vocab), self.num_steps, self.num_steps / self.steps_per_epoch,
                 self.steps_per_epoch)
    self.checkpoints = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
    resumed = self._restore()
    self.train_fn, self.eval_fn = make_steps(cfg, tx, self.strategy)
    self.step = self.start_step = int(self.state.step)
    self.writer = workdir_lib.MetricsWriter(workdir, active=main_process,
                                            resume_step=self.step if resumed else None)
    # Records past the restored step describe lost work: drop them, as if never interrupted.
    kept = devices.main_process_first(lambda: workdir_lib.rewind_metrics(
        self.writer.path, self.step if resumed else -1))
    self.evaluated = {r["step"] for r in kept if r.get("kind") == "valid"}  # not to log again
    self.result: dict[str, Any] = {"step": self.step}
    self.pending: list[dict[str, jax.Array]] = []
    self.words = 0
    self.hooks: list[Hook] = []
    self.stopped_by: int | None = None
    self.sync_every = cfg.train.log_every if cfg.train.log_every > 0 else SYNC_EVERY
    self.unchecked: list[tuple[jax.Array, int, tuple[int, int]]] = []  # (finite, step, position)
    self.bad_streak = 0  # consecutive non-finite steps
    self.t_logged = time.perf_counter()  # when the last train record was written
    self.progress_bar = None
    if progress:
      from tqdm import tqdm
      self.progress_bar = tqdm(total=self.num_steps, initial=self.step, unit="step",
                               dynamic_ncols=True, file=sys.stderr)

  def _restore(self) -> bool:
    """Loads the newest usable checkpoint, if any, into the state and the batch iterator.
    Checkpoints hold the canonical state, whatever the strategy."""
    like = self.strategy.to_canonical(self.state)
    restored = checkpoint.restore_newest(self.checkpoints, like)
    if restored is None:
      return False
    state, data_state, latest = restored
    self.state = self.strategy.from_canonical(state)
    where = os.path.join(self.workdir, checkpoint.CHECKPOINT_DIR, str(latest))
    saved = data_state.get("corpus", self.corpus_id["corpus"])  # older checkpoints: no key
    if saved != self.corpus_id["corpus"]:
      raise sources.DataError(
          f"{where}: trained on the corpus {data_state.get('corpus_name')} (content key "
          f"{saved}), but this run reads {self.corpus_id['corpus_name']} (content key "
          f"{self.corpus_id['corpus']}); resume with the original corpus, or use a new --workdir")
    try:
      self.batches.restore(data_state)
    except ValueError as e:  # the corpus is not the one the checkpoint was trained on
      raise sources.DataError(f"{where}: {e}; resume with the original corpus, or use a new "
                              "--workdir") from None
    logging.info("resumed from checkpoint at step %d (epoch %d, batch %d)", latest,
                 self.batches.epoch, self.batches.index)
    return True

  def add_hook(self, fn: HookFn, every: int, **options: bool) -> None:
    """Calls `fn(trainer)` after every `every`-th step (0: never during the loop) and, unless
    at_end=False, once when the loop ends (if it did not just run). Options: see `Hook`."""
    self.hooks.append(Hook(fn, every, **options))

  def _call(self, hook: Hook) -> None:
    hook.fn(self)
    hook.last_step = self.step

  def run(self) -> dict[str, Any]:
    """The loop: train steps until num_steps or a signal, with the hooks; returns `result`.

    The host never waits for a step inside the loop except every `sync_every` steps
    (train.log_every), where it reads the steps' finite flags (`check_finite`) and, with
    several processes, agrees with the others on whether a signal arrived (`_stop_signal`),
    so that every process stops after the same step.
    """
    if self.step == 0:
      for hook in self.hooks:
        if hook.at_start:
          self._call(hook)
    with StopSignal() as stop:
      while self.step < self.num_steps and self._stop_signal(stop) is None:
        position = (self.batches.epoch, self.batches.index)
        words, batch = next(self.batches)
        self.words += words
        self.state, metrics = self.train_fn(self.state, batch)
        self.step += 1
        if self.step == self.start_step + 1:  # data, initialization, compilation and one step
          jax.block_until_ready(metrics)
          self.result["seconds_to_first_step"] = time.perf_counter() - self.t_start
          logging.info("first step done %.1f s after start", self.result["seconds_to_first_step"])
        self.pending.append(metrics)
        self.unchecked.append((metrics["finite"], self.step, position))
        if self.progress_bar is not None:
          self.progress_bar.update(1)
        if self.step % self.sync_every == 0:
          self.check_finite()
        for hook in self.hooks:
          if hook.every and self.step % hook.every == 0:
            self._call(hook)
      self.stopped_by = self._stop_signal(stop, final=True)
      self.check_finite()
      for hook in self.hooks:
        if (hook.at_end and hook.last_step != self.step
            and (self.stopped_by is None or hook.when_stopped)):
          self._call(hook)
    if self.stopped_by is not None:
      logging.warning("stopped by signal %d at step %d; checkpoint saved. Exit status %d; rerun "
                      "the same command to resume.", self.stopped_by, self.step,
                      128 + self.stopped_by)
    self.result["step"] = self.step
    self.result["interrupted"] = self.stopped_by is not None
    self.result["signal"] = self.stopped_by
    return self.result

  def _stop_signal(self, stop: StopSignal, final: bool = False) -> int | None:
    """The signal that stops the run here, if any. One process stops at the first step
    boundary after its signal. Several agree (the largest signal number any of them received)
    every `sync_every` steps and when the loop ends (`final`): a collective that every process
    reaches at the same step, so all stop together and write one checkpoint."""
    if jax.process_count() == 1:
      return stop.received
    if not final and self.step % self.sync_every:
      return None
    return devices.agree(stop.received or 0) or None

  def check_finite(self) -> None:
    """Reads the finite flags of the steps not yet checked (one transfer), warns about each
    non-finite one (its update was skipped) and raises FloatingPointError after
    train.max_bad_steps consecutive ones."""
    if not self.unchecked:
      return
    checked, self.unchecked = self.unchecked, []
    flags = fetch_metrics([{"finite": f} for f, _, _ in checked])
    for flag, (_, at_step, position) in zip(flags, checked):
      if bool(flag["finite"]):
        self.bad_streak = 0
        continue
      self.bad_streak += 1
      logging.warning("step %d: non-finite loss or gradient; update skipped (epoch %d, batch "
                      "%d)", at_step, *position)
      limit = self.cfg.train.max_bad_steps
      if limit > 0 and self.bad_streak >= limit:
        raise FloatingPointError(
            f"{self.bad_streak} consecutive non-finite steps ending at step {at_step}; lower "
            "optim.learning_rate or check the data")

  def valid_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return pipeline.eval_batches(self.valid, self.cfg.train.eval_batch_size,
                                 self.cfg.data.bucket_width, self.cfg.data.bucket_growth,
                                 self.strategy.host_rows(self.cfg.train.eval_batch_size))

  def close(self) -> None:
    """Teardown: stops the batch thread, waits for checkpoints being written, closes the
    metrics and the progress bar."""
    self.batches.close()
    checkpoint.wait(self.checkpoints)
    self.writer.close()
    if self.progress_bar is not None:
      self.progress_bar.close()


_stack = jax.jit(lambda metrics: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics))


def fetch_metrics(metrics: list[dict[str, jax.Array]]) -> list[dict[str, np.ndarray]]:
  """Steps' metrics on the host, stacked on the devices first: one transfer per kind of
  metric, not one per step. The list is padded (with its last entry) to a power of two, so
  that the jitted stack compiles for a few lengths only."""
  if not metrics:
    return []
  n = len(metrics)
  padded = list(metrics) + [metrics[-1]] * ((1 << (n - 1).bit_length()) - n)
  stacked = jax.device_get(_stack(padded))
  return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def log_train(t: Trainer) -> None:
  """A "train" record of the steps since the last one; skipped steps stay out of the means."""
  if not t.pending:
    return
  host = fetch_metrics(t.pending)
  now = time.perf_counter()
  skipped = sum(1 for m in host if not bool(m["finite"]))
  host = [m for m in host if bool(m["finite"])] or host
  nll = sum(float(m["nll_sum"]) for m in host)
  toks = sum(int(m["num_tokens"]) for m in host)
  rec = {"kind": "train", "step": t.step, "epoch": t.step / t.steps_per_epoch,
         "loss": float(np.mean([float(m["loss"]) for m in host])),
         "train_nll": nll / max(toks, 1), "train_ppl": math.exp(min(nll / max(toks, 1), 700.0)),
         "lr": float(t.schedule(t.step - 1)), "grad_norm": float(host[-1]["grad_norm"]),
         "words_per_s": t.words / max(now - t.t_logged, 1e-9), "skipped_steps": skipped}
  t.writer.write(rec)
  t.result.update(rec)
  t.pending, t.words, t.t_logged = [], 0, now
  if t.progress_bar is not None:
    t.progress_bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['train_ppl']:.2f}",
                               lr=f"{rec['lr']:.4g}", wps=f"{rec['words_per_s']:.0f}")


def evaluate(t: Trainer) -> None:
  """Validation perplexity: a "valid" record (once per step, also across resumes)."""
  _, ppl = decode.perplexity(t.eval_fn, t.state.params, t.valid_batches())
  if t.step not in t.evaluated:
    t.writer.write({"kind": "valid", "step": t.step, "valid_ppl": ppl})
    t.evaluated.add(t.step)
  t.result["valid_ppl"] = ppl
  logging.info("step %d: valid_ppl %.3f", t.step, ppl)


def save_checkpoint(t: Trainer) -> None:
  """A checkpoint of the canonical state and the data position (asynchronous), after the finite
  flags of every step before it are checked (`Trainer.check_finite`)."""
  t.check_finite()
  if t.checkpoints.latest_step() == t.step:
    return
  checkpoint.save(t.checkpoints, t.step, t.strategy.to_canonical(t.state),
                  dict(t.batches.state(), **t.corpus_id))


def add_builtin_hooks(t: Trainer) -> None:
  """The periodic actions of every run: log, evaluate, checkpoint (train.*_every steps)."""
  c = t.cfg.train
  t.add_hook(log_train, c.log_every)
  t.add_hook(evaluate, c.eval_every, at_start=c.eval_every > 0, when_stopped=False)
  t.add_hook(save_checkpoint, c.checkpoint_every)


def train(cfg: Config, workdir: str, progress: bool = True,
          hooks: Sequence[tuple[HookFn, int]] = ()) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`. Returns the final metrics. `hooks`: more (fn, every)
  periodic actions, called after the built-in ones."""
  trainer = Trainer(cfg, workdir, progress)
  try:
    add_builtin_hooks(trainer)
    for fn, every in hooks:
      trainer.add_hook(fn, every)
    return trainer.run()
  finally:
    trainer.close()


def main(preset: Config, argv: Sequence[str] | None,
         after: Callable[[Config, str], None] | None = None) -> int:
  """Command line of the experiment presets: --workdir DIR and --section.field=value overrides;
  --prepare_data prepares the corpus (and the WORKDIR's vocabularies) and stops. `after(cfg,
  workdir)` runs when training ends without a signal (the quickstart's evaluation). Only
  process 0 prints. Exit status: 0 when training is done; 128 + the signal number (143 for
  SIGTERM, 130 for SIGINT) when a signal stopped it after saving a checkpoint, so that a
  scheduler restarts the command, which resumes there."""
  def run(argv: Sequence[str] | None) -> int:
    updates, extras = config_lib.parse_args(argv or [], extra_flags=("workdir", "prepare_data"))
    cfg = config_lib.override(preset, updates)
    if "workdir" not in extras:
      raise config_lib.ConfigError("--workdir DIR is required")
    workdir = extras["workdir"]
    if extras.get("prepare_data", "false").lower() in ("true", "1", "yes"):
      corpus = pipeline.load_corpus(cfg.data, workdir, progress=True)
      print(json.dumps({"prepared": corpus.prepared.folder, "stats": corpus.stats}))
      return 0
    result = train(cfg, workdir)
    quiet = (contextlib.nullcontext() if devices.is_main_process()
             else contextlib.redirect_stdout(io.StringIO()))
    with quiet:
      if result["interrupted"]:
        print(json.dumps({"step": result["step"], "interrupted_by_signal": result["signal"]}))
        return 128 + result["signal"]
      if after is not None:
        after(cfg, workdir)
      print(json.dumps({k: result[k] for k in ("step", "valid_ppl", "train_ppl") if k in result}))
    return 0

  return cli.run(run, argv)
