"""Many processes: two `jax.distributed` processes on this machine (CPU, gloo collectives, 4
devices each) train like one process with 8 devices under mesh, pmap and layers; checkpoints
move between 2 processes and 1; a signal to either process, or to both at different moments,
stops both after the same step with one checkpoint and exit status 128 + the signal; only
process 0 prints. One start of the two workers (tests/multiprocess_worker.py) runs every
phase."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import write_toy_corpus

from s2s_jax import checkpoint, train
from s2s_jax import config as c

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
STEPS = 12
# No validation sentences: the final evaluation then compiles nothing (perplexity 1).
TINY = {"data.source": "text", "data.tokenizer": "none", "model.num_layers": 1,
        "model.hidden_size": 16, "model.embed_size": 8, "data.bucket_width": 8,
        "train.batch_size": 16, "train.eval_batch_size": 16, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.log_every": 2, "train.num_steps": STEPS,
        "optim.schedule": "constant", "optim.learning_rate": 0.5}
# layers: 1 LSTM stage and 3 softmax stages (12 target ids) per group of 4 devices, 2 groups
LAYOUTS = {"mesh": {}, "pmap": {"parallel.strategy": "pmap"},
           "layers": {"parallel.strategy": "layers", "parallel.model": 3,
                      "data.tgt_vocab_size": 8}}


def flags(corpus, **updates):
  return [f"--{k}={v}" for k, v in {**TINY, "data.path": corpus, **updates}.items()]


def config(corpus, **updates):
  return c.override(c.Config(), {**TINY, "data.path": corpus, **updates})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_workers(plan_path: str, logs: str) -> list[subprocess.Popen]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_NUM_PROCESSES="2",
             JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", PYTHONUNBUFFERED="1",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return [subprocess.Popen([sys.executable, WORKER, plan_path], cwd=REPO,
                           env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                           stderr=open(f"{logs}.{i}.log", "w"), text=True) for i in range(2)]


def params_of(workdir):
  _, params, _, _, step = checkpoint.load_model(workdir)
  return jax.device_get(params), step


def assert_close(got, want, rtol=1e-5):
  """Every leaf within rtol of the largest magnitude in the reference leaf."""
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), jax.tree_util.keystr(path)


def results(text):
  """The JSON result lines in a process's output, and what else is left once the gloo
  library's own connection messages (which its threads print at any moment) are taken out."""
  text = re.sub(r"\[Gloo\][^\n]*?peer ranks is : \d+", "", text)
  lines = [line for line in text.splitlines() if line.strip()]
  return [json.loads(line) for line in lines if line.startswith("{")], [
      line for line in lines if not line.startswith("{")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The workers' runs, with one-process references trained here on 8 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  corpus = write_toy_corpus(str(root / "corpus"), sizes=(("train", 160), ("valid", 0),
                                                         ("test", 8)))
  wd = {name: str(root / name) for name in ("pmap", "layers", "from_one", "signals", "ref_mesh",
                                            "ref_pmap", "ref_layers")}
  for name, updates in LAYOUTS.items():
    train.train(config(corpus, **updates), wd[f"ref_{name}"], progress=False)
  # a checkpoint written by one process (step 6), which two processes resume twice: without
  # interruption (mesh) and with signals
  train.train(config(corpus, **{"train.num_steps": STEPS // 2}), wd["from_one"], progress=False)
  shutil.copytree(wd["from_one"], wd["signals"])
  term, intr = int(signal.SIGTERM), int(signal.SIGINT)
  plan = {"out": str(root / "status"), "runs": [
      {"argv": ["--workdir", wd["from_one"], *flags(corpus)]},
      *({"argv": ["--workdir", wd[name], *flags(corpus, **LAYOUTS[name])]}
        for name in ("pmap", "layers")),
      # SIGTERM to process 0 after step 7 and SIGINT to process 1 after step 8, then SIGINT
      # to process 1 alone after step 9, then to the end
      {"argv": ["--workdir", wd["signals"], *flags(corpus)], "signals": {"0": [7, term],
                                                                         "1": [8, intr]}},
      {"argv": ["--workdir", wd["signals"], *flags(corpus)], "signals": {"1": [9, intr]}},
      {"argv": ["--workdir", wd["signals"], *flags(corpus)]}]}
  plan_path = str(root / "plan.json")
  with open(plan_path, "w") as f:
    json.dump(plan, f)
  procs = start_workers(plan_path, str(root / "worker"))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  logs = [open(str(root / f"worker.{i}.log")).read() for i in range(2)]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  statuses = [json.load(open(f"{plan['out']}.{i}.json")) for i in range(2)]
  return {"wd": wd, "corpus": corpus, "outs": outs, "logs": logs, "statuses": statuses}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_train_like_one(runs, layout):
  got = runs["wd"]["from_one" if layout == "mesh" else layout]  # mesh: from step 6 on
  (got, step), (want, ref_step) = params_of(got), params_of(runs["wd"][f"ref_{layout}"])
  assert step == ref_step == STEPS
  assert_close(got, want)


def test_checkpoints_move_between_one_process_and_two(runs, tmp_path):
  wd = runs["wd"]
  # written by one process at step 6, resumed by two (test_two_processes_train_like_one[mesh])
  assert "resumed from checkpoint at step 6 " in runs["logs"][0]
  # written by two processes at step 12, restored here by one (the whole train state and the
  # data position) and trained on: the same as one process all along
  moved, ref = str(tmp_path / "moved"), str(tmp_path / "ref")
  shutil.copytree(wd["from_one"], moved)
  shutil.copytree(wd["ref_mesh"], ref)
  more = config(runs["corpus"], **{"train.num_steps": STEPS + 2})
  assert train.train(more, moved, progress=False)["step"] == STEPS + 2
  assert train.train(more, ref, progress=False)["step"] == STEPS + 2
  assert_close(params_of(moved)[0], params_of(ref)[0])


def test_signals_stop_both_processes_at_the_same_step_and_the_rerun_resumes_exactly(runs):
  # Signals to both processes stop both at the next sync (train.log_every=2: step 8), exit
  # status 128 + the largest signal number; one to process 1 alone (after step 9) stops both
  # at step 10.
  assert runs["statuses"][0] == runs["statuses"][1] == [
      0, 0, 0, 128 + signal.SIGTERM, 128 + signal.SIGINT, 0]
  ckpts = sorted(checkpoint.manager(runs["wd"]["signals"], read_only=True).all_steps())
  assert ckpts == [8, 10, STEPS]  # one checkpoint at each stop (6 is gone: keep 3)
  for step in (8, 10):
    assert f"resumed from checkpoint at step {step} " in runs["logs"][0]
  # interrupted twice and resumed, the run ends bit-identical to the uninterrupted one
  (got, step), (want, _) = params_of(runs["wd"]["signals"]), params_of(runs["wd"]["from_one"])
  assert step == STEPS
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_only_process_0_prints(runs):
  (lines, rest), (one, one_rest) = (results(out) for out in runs["outs"])
  assert one == one_rest == rest == []
  assert [line["step"] for line in lines] == [STEPS] * 3 + [8, 10, STEPS]
  assert lines[3] == {"step": 8, "interrupted_by_signal": signal.SIGTERM}
