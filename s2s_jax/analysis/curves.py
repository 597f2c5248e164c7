"""Training curves of one or more runs: perplexity and learning rate against step.

    python -m s2s_jax.analysis.curves --workdir DIR [DIR2 ...] [--labels a,b] [--out DIR]

Reads each WORKDIR's metrics.jsonl (train lines: step, train_ppl, lr; valid lines: step,
valid_ppl) and draws train perplexity (thin line) and validation perplexity (markers) of every
run on one log-scale axis, the learning rate below, so runs that differ in optimizer, depth or
reversal can be compared at a glance. Writes curves.png and curves.json (the series drawn).
A resumed run's metrics.jsonl holds each step once (the trainer rewinds it on resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from s2s_jax import cli
from s2s_jax.analysis import common
from s2s_jax.workdir import METRICS_FILE


def read_series(workdir: str) -> dict[str, list[list[float]]]:
  """{"train_ppl": [[step, value], ...], "valid_ppl": [...], "lr": [...]} from metrics.jsonl.

  A line that is not JSON (say, the last one of a killed run) is skipped with a warning naming
  the file and line.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (is {workdir} a training WORKDIR?)")
  out: dict[str, list[list[float]]] = {"train_ppl": [], "valid_ppl": [], "lr": []}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        logging.warning("%s: line %d: not JSON (%s); skipped", path, n, e.msg)
        continue
      kind, step = rec.get("kind"), rec.get("step")
      if step is None:
        continue
      if kind == "train":
        for key in ("train_ppl", "lr"):
          if rec.get(key) is not None:
            out[key].append([float(step), float(rec[key])])
      elif kind == "valid" and rec.get("valid_ppl") is not None:
        out["valid_ppl"].append([float(step), float(rec["valid_ppl"])])
  return out


def plot(runs: dict[str, dict[str, list[list[float]]]], path: str) -> None:
  plt = common.pyplot()
  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for k, (label, s) in enumerate(runs.items()):
    color = colors[k % len(colors)]
    if s["train_ppl"]:
      x, y = zip(*s["train_ppl"])
      ax.plot(x, y, color=color, lw=1, alpha=0.7, label=f"{label} train")
    if s["valid_ppl"]:
      x, y = zip(*s["valid_ppl"])
      ax.plot(x, y, color=color, marker="o", ms=4, lw=1.5, label=f"{label} valid")
    if s["lr"]:
      x, y = zip(*s["lr"])
      ax_lr.plot(x, y, color=color, lw=1)
  ax.set_yscale("log")
  ax.set_ylabel("perplexity")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("step")
  ax_lr.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curves(workdirs: Sequence[str], labels: Sequence[str], out: str) -> dict[str, Any]:
  """Reads every run, writes curves.png and curves.json into `out`; returns the series."""
  if len(labels) != len(workdirs):
    raise ValueError(f"--labels has {len(labels)} names for {len(workdirs)} WORKDIRs")
  runs = {label: read_series(w) for label, w in zip(labels, workdirs)}
  os.makedirs(out, exist_ok=True)
  plot(runs, os.path.join(out, "curves.png"))
  common.write_json(os.path.join(out, "curves.json"), runs)
  return runs


def _main(argv: Sequence[str] | None) -> int:
  p = argparse.ArgumentParser(prog="python -m s2s_jax.analysis.curves",
                              description=__doc__.split("\n")[0])
  p.add_argument("--workdir", nargs="+", required=True, help="training WORKDIR(s)")
  p.add_argument("--labels", help="comma list of legend names (default: the folder names)")
  p.add_argument("--out", help="folder for curves.png and curves.json (default: the first WORKDIR)")
  args = p.parse_args(argv)
  labels = (args.labels.split(",") if args.labels
            else [os.path.basename(os.path.normpath(w)) for w in args.workdir])
  out = args.out or args.workdir[0]
  runs = curves(args.workdir, labels, out)
  for label, s in runs.items():
    last = s["valid_ppl"][-1] if s["valid_ppl"] else None
    print(f"{label}: {len(s['train_ppl'])} train points"
          + (f", last valid ppl {last[1]:.3f} at step {last[0]:.0f}" if last else ""))
  print(f"wrote {os.path.join(out, 'curves.png')}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
