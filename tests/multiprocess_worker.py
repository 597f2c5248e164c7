"""One process of tests/test_multiprocess.py: `jax.distributed` from the environment (the test
starts two of these), then the training runs of a plan, in order, through the presets' command
line (`train.main`), as `python -m experiments.X` would run them.

    python tests/multiprocess_worker.py PLAN.json

PLAN.json: {"runs": [{"argv": [...], "signals": {"<process index>": [step, signal number]}}],
"out": PREFIX}. A run's `signals` make this process send itself that real signal after that
step. The exit status of every run goes to PREFIX.<process index>.json; stdout is what
train.main prints (process 0 only).
"""

from __future__ import annotations

import json
import os
import sys

import jax

from s2s_jax import config as config_lib
from s2s_jax import train


def main(plan_path: str) -> None:
  with open(plan_path) as f:
    plan = json.load(f)
  original = train.train
  signals: dict[str, list[int]] = {}

  def send(t: train.Trainer) -> None:  # a hook: jax.distributed has started by then
    at = signals.get(str(jax.process_index()))
    if at is not None and t.step == at[0]:
      os.kill(os.getpid(), at[1])

  def with_signals(cfg, workdir, progress=True, hooks=()):
    return original(cfg, workdir, progress, [*hooks, (send, 1)])

  train.train = with_signals
  statuses = []
  for run in plan["runs"]:
    signals.clear()
    signals.update(run.get("signals", {}))
    statuses.append(train.main(config_lib.Config(), run["argv"]))
  with open(f"{plan['out']}.{jax.process_index()}.json", "w") as f:
    json.dump(statuses, f)


if __name__ == "__main__":
  main(sys.argv[1])
