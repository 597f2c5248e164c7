"""Crash-safe resume: a run SIGKILLed three times, restarted with the same command each time,
ends bit-identical to an uninterrupted run (parameters, optimizer state, metrics.jsonl).

The kills land (1) in the middle of writing a checkpoint (every file written, the folder not
yet renamed into place), (2) at a step between two checkpoints, (3) right after a checkpoint
commits (when orbax may be deleting an old one). The run kills itself when it reaches each
point (`KILL_AT` below): nothing depends on the machine's speed. Runs are subprocesses of the
real CLI entry point; a JAX persistent compilation cache shared by the runs keeps restarts
short.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from conftest import write_toy_corpus

from experiments import quickstart
from s2s_jax import checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quickstart's command line, which SIGKILLs itself where KILL_AT=<point>:<step> says:
#   save    when orbax renames the finished folder of checkpoint <step> into place
#   step    after train step <step> was started, no checkpoint being written (a hook)
#   commit  once checkpoint <step>, started at that step, is committed (the same hook)
ENTRY = """
import os, signal, sys
from experiments import quickstart
from s2s_jax import train
point, at = os.environ.get("KILL_AT", "none:0").split(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "save":
  rename = os.rename
  def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(dst) == at and ".orbax-checkpoint-tmp" in os.path.basename(src):
      die()
    return rename(src, dst, *args, **kwargs)
  os.rename = rename_or_die
def hook(t):
  if t.step == int(at):
    t.checkpoints.wait_until_finished()
    die()
if point in ("step", "commit"):
  run = train.train
  train.train = lambda cfg, workdir, progress=True, hooks=(): run(
      cfg, workdir, progress, [*hooks, (hook, 1)])
sys.exit(train.main(quickstart.config(), sys.argv[1:]))
"""
FLAGS = ["--data.source=text", "--data.tokenizer=none", "--model.hidden_size=16",
         "--model.embed_size=8", "--data.bucket_width=8", "--model.num_layers=1",
         "--train.batch_size=8",
         "--train.num_steps=60", "--train.checkpoint_every=10", "--train.log_every=10",
         "--train.eval_every=0", "--train.keep_checkpoints=3"]


def _env(cache: str, kill_at: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("KILL_AT", None)
  if kill_at:
    env["KILL_AT"] = kill_at
  return env


def _run(workdir: str, corpus: str, cache: str, log: str, kill_at: str | None = None,
         extra: tuple[str, ...] = ()) -> int:
  """Runs the CLI to its end (or its kill); returns its exit status (-9 when killed)."""
  cmd = [sys.executable, "-c", ENTRY, "--workdir", workdir, f"--data.path={corpus}", *FLAGS,
         *extra]
  with open(log, "w") as err:
    return subprocess.run(cmd, cwd=REPO, env=_env(cache, kill_at), stdout=subprocess.DEVNULL,
                          stderr=err, timeout=300).returncode


def _ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, checkpoint.CHECKPOINT_DIR)


def _listing(workdir: str) -> list[str]:
  try:
    return os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    return []


def _committed(workdir: str) -> set[int]:
  return {int(n) for n in _listing(workdir) if n.isdigit()}


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
  assert _run(ref, corpus, cache, str(tmp_path / "ref.log")) == 0, \
      open(tmp_path / "ref.log").read()[-3000:]

  logs = [str(tmp_path / f"run{i}.log") for i in range(1, 5)]
  killed_at = []
  # 1. Killed while checkpoint 20 is being written: its files are there, not yet renamed.
  assert _run(run, corpus, cache, logs[0], "save:20") == -signal.SIGKILL
  assert "20.orbax-checkpoint-tmp" in _listing(run) and _committed(run) == {10}
  killed_at.append(10)
  # 2. Resumed from 10, killed after step 27, between two checkpoints.
  assert _run(run, corpus, cache, logs[1], "step:27") == -signal.SIGKILL
  assert _committed(run) == {10, 20}
  killed_at.append(20)
  # 3. Resumed from 20, killed right after checkpoint 30 commits.
  assert _run(run, corpus, cache, logs[2], "commit:30") == -signal.SIGKILL
  assert _committed(run) == {10, 20, 30}
  killed_at.append(30)
  # 4. Resumed from 30 to the end.
  assert _run(run, corpus, cache, logs[3]) == 0, open(logs[3]).read()[-3000:]

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
  corpus = write_toy_corpus(str(tmp_path / "corpus"))
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's: what the reference compiled
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  extra = ("--model.kernels=plain", "--parallel.data=1")
  argv = ["--workdir", ref, f"--data.path={corpus}", *FLAGS, *extra]
  assert train.main(quickstart.config(), argv) == 0  # the reference, in this process
  logs = [str(tmp_path / f"run{i}.log") for i in (1, 2)]
  assert _run(run, corpus, cache, logs[0], "commit:30", extra) == -signal.SIGKILL
  assert _committed(run) == {10, 20, 30}
  assert _run(run, corpus, cache, logs[1], None, extra) == 0, open(logs[1]).read()[-3000:]
  assert "resumed from checkpoint at step 30 " in open(logs[1]).read()
  (ref_params, ref_integrity), (run_params, run_integrity) = _final_state(ref), _final_state(run)
  for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(run_params),
                  strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert run_integrity == ref_integrity
  assert _metrics(run) == _metrics(ref)
