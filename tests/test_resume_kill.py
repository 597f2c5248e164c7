"""Crash-safe resume: a run SIGKILLed three times, restarted with the same command each time,
ends bit-identical to an uninterrupted run (parameters, optimizer state, metrics.jsonl).

The kills land (1) while a checkpoint is being written (the run is frozen with SIGSTOP the
moment a temporary checkpoint folder appears, and killed if the folder is still there), (2) at
a seeded random moment within a checkpoint interval (measured on that run), (3) right after a
checkpoint commits (when orbax may be deleting an old one). Runs are subprocesses of the real
CLI entry point; a JAX persistent compilation cache shared by the runs keeps restarts short.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import write_toy_corpus
from s2s_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = ("import sys; from experiments import quickstart; from s2s_jax import train; "
         "sys.exit(train.main(quickstart.config(), sys.argv[1:]))")
FLAGS = ["--data.source=text", "--data.tokenizer=none", "--model.hidden_size=16",
         "--model.embed_size=8", "--data.bucket_width=8", "--model.num_layers=1", "--train.batch_size=8",
         "--train.num_steps=60", "--train.checkpoint_every=10", "--train.log_every=10",
         "--train.eval_every=0", "--train.keep_checkpoints=3"]


def _env(cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _start(workdir: str, corpus: str, cache: str, log: str) -> subprocess.Popen:
  cmd = [sys.executable, "-c", ENTRY, "--workdir", workdir, f"--data.path={corpus}", *FLAGS]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL,
                          stderr=open(log, "w"))


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
  """Polls (every ~1 ms) until ready() or the process ends; fails on timeout."""
  end = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before the kill point"
    assert time.monotonic() < end, "timed out waiting for the kill point"
    time.sleep(0.001)


def _kill(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(30) == -signal.SIGKILL


def _ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, checkpoint.CHECKPOINT_DIR)


def _listing(workdir: str) -> list[str]:
  try:
    return os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    return []


def _writing(workdir: str) -> bool:
  """A temporary (uncommitted) checkpoint folder exists."""
  return any(".orbax-checkpoint-tmp" in n for n in _listing(workdir))


def _committed(workdir: str) -> set[int]:
  return {int(n) for n in _listing(workdir) if n.isdigit()}


def _kill_during_write(proc: subprocess.Popen, workdir: str) -> None:
  """Freezes the run when a save is seen in progress; kills it if the save is still unfinished."""
  while True:
    _wait_for(proc, lambda: _writing(workdir))
    proc.send_signal(signal.SIGSTOP)
    if _writing(workdir):
      _kill(proc)
      return
    proc.send_signal(signal.SIGCONT)  # the save finished just before the freeze: next one


def _wait_for_new_commit(proc: subprocess.Popen, workdir: str, seen: set[int]) -> float:
  _wait_for(proc, lambda: _committed(workdir) - seen)
  seen |= _committed(workdir)
  return time.monotonic()


def _final_state(workdir: str) -> tuple[dict, dict]:
  """Params of the last checkpoint, and the integrity record (checksums of every state leaf)."""
  _, params, _, _, step = checkpoint.load_model(workdir)
  assert step == 60
  with open(os.path.join(_ckpt_dir(workdir), "60", "integrity", "metadata")) as f:
    integrity = json.load(f)
  return params, integrity


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  for r in recs:
    r.pop("words_per_s", None)  # a timing, the one field allowed to differ
  return recs


def test_sigkill_three_times_then_bit_identical(tmp_path):
  corpus = write_toy_corpus(str(tmp_path / "corpus"))
  cache = str(tmp_path / "jax_cache")
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")

  ref_proc = _start(ref, corpus, cache, str(tmp_path / "ref.log"))
  assert ref_proc.wait(300) == 0, open(tmp_path / "ref.log").read()[-3000:]

  rng = random.Random(1234)
  logs = [str(tmp_path / f"run{i}.log") for i in range(1, 5)]

  # 1. Killed while a checkpoint is being written.
  proc = _start(run, corpus, cache, logs[0])
  _kill_during_write(proc, run)
  assert any(".orbax-checkpoint-tmp" in n for n in _listing(run))  # a half-written save is left
  killed_at = [max(_committed(run), default=0)]

  # 2. Resumed, then killed at a random moment within the interval between two checkpoints.
  proc = _start(run, corpus, cache, logs[1])
  seen = _committed(run)
  t1 = _wait_for_new_commit(proc, run, seen)
  t2 = _wait_for_new_commit(proc, run, seen)
  time.sleep(rng.uniform(0.0, t2 - t1))
  _kill(proc)
  killed_at.append(max(_committed(run)))

  # 3. Resumed, then killed right after its first new checkpoint commits.
  proc = _start(run, corpus, cache, logs[2])
  _wait_for_new_commit(proc, run, _committed(run))
  _kill(proc)
  killed_at.append(max(_committed(run)))
  assert killed_at[-1] < 60, killed_at  # the last run still has steps to do

  # 4. Resumed to the end.
  proc = _start(run, corpus, cache, logs[3])
  assert proc.wait(300) == 0, open(logs[3]).read()[-3000:]

  # Every restart resumed from the newest complete checkpoint the kill left, which was sound.
  for newest, log in zip(killed_at, logs[1:]):
    text = open(log).read()
    assert ("resumed from checkpoint at step" in text) == (newest > 0), text[-2000:]
    if newest:
      assert f"resumed from checkpoint at step {newest} " in text, text[-2000:]
    assert "unusable" not in text, text[-2000:]
  assert not any(".orbax-checkpoint-tmp" in n for n in _listing(run))  # leftovers cleaned up

  ref_params, ref_integrity = _final_state(ref)
  run_params, run_integrity = _final_state(run)
  ref_flat = jax.tree_util.tree_flatten_with_path(ref_params)[0]
  run_flat = jax.tree_util.tree_flatten_with_path(run_params)[0]
  assert [p for p, _ in ref_flat] == [p for p, _ in run_flat]
  for (path, a), (_, b) in zip(ref_flat, run_flat):
    assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
  # Optimizer state, step and RNG key too (their checksums), and the data position.
  assert run_integrity == ref_integrity
  with open(os.path.join(_ckpt_dir(ref), "60", "data", "metadata")) as f_ref, \
       open(os.path.join(_ckpt_dir(run), "60", "data", "metadata")) as f_run:
    assert json.load(f_run) == json.load(f_ref)
  # The metrics log reads as if never interrupted: records past a restored step were dropped.
  assert _metrics(run) == _metrics(ref)
  assert [r["step"] for r in _metrics(ref) if r["kind"] == "train"] == [10, 20, 30, 40, 50, 60]


def test_sigkill_with_plain_kernels_then_bit_identical(tmp_path):
  """model.kernels=plain, the path GPUs and TPUs run: killed right after a checkpoint commits,
  restarted, and bit-identical at the end to the same run trained without interruption."""
  from experiments import quickstart
  from s2s_jax import train
  corpus = write_toy_corpus(str(tmp_path / "corpus"))
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's: what the reference compiled
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  argv = lambda workdir: ["--workdir", workdir, f"--data.path={corpus}", *FLAGS,
                          "--model.kernels=plain", "--parallel.data=1"]
  assert train.main(quickstart.config(), argv(ref)) == 0  # the reference, in this process
  logs = [str(tmp_path / f"run{i}.log") for i in (1, 2)]
  start = lambda log: subprocess.Popen([sys.executable, "-c", ENTRY, *argv(run)], cwd=REPO,
                                       env=_env(cache), stdout=subprocess.DEVNULL,
                                       stderr=open(log, "w"))
  proc = start(logs[0])
  _wait_for_new_commit(proc, run, set())
  _kill(proc)
  proc = start(logs[1])
  assert proc.wait(300) == 0, open(logs[1]).read()[-3000:]
  assert "resumed from checkpoint at step" in open(logs[1]).read()
  (ref_params, ref_integrity), (run_params, run_integrity) = _final_state(ref), _final_state(run)
  for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(run_params),
                  strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert run_integrity == ref_integrity
