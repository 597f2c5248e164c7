"""The WORKDIR's bookkeeping on (re)start: the saved config and the metrics log.

A WORKDIR holds one run. Its config.json is written by the first start; a later start (a
resume) must ask for the same config, except for the fields in `RESUMABLE_FIELDS` and
`RESUMABLE_SECTIONS`, which only say how long to train, how often to log, evaluate and
checkpoint, where the corpus lies, how to decode and which devices to use. Any other
difference (model shape, vocabulary, data, optimizer, batch size, seed) is refused with the
list of differing fields, unless `train.allow_config_change=true` is passed; then the new
config replaces the saved one (checkpoints must still fit the new model shapes).

metrics.jsonl may hold records written after the checkpoint a run resumes from (the work the
interruption lost); `rewind_metrics` drops them, and any half-written last line, so that the
log of an interrupted and resumed run reads like that of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from s2s_jax import config as config_lib
from s2s_jax.config import Config, ConfigError

CONFIG_FILE = "config.json"

RESUMABLE_FIELDS = frozenset({
    "train.num_steps", "train.num_epochs", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.eval_batch_size", "train.max_bad_steps",
    "train.allow_config_change", "data.max_eval_sentences", "data.path", "data.tfds_data_dir",
    "data.tfds_manual_dir", "data.download", "data.prepared_dir", "data.workers",
})
RESUMABLE_SECTIONS = ("decode", "parallel")


def changed_fields(saved: Config, requested: Config) -> tuple[list[str], list[str]]:
  """(differences that a resume may make, differences that it may not), as `name: a -> b`."""
  allowed, refused = [], []
  for line in config_lib.diff(saved, requested):
    name = line.split(":", 1)[0]
    ok = name in RESUMABLE_FIELDS or name.split(".", 1)[0] in RESUMABLE_SECTIONS
    (allowed if ok else refused).append(line)
  return allowed, refused


def _write_config(cfg: Config, path: str) -> None:
  tmp = path + ".tmp"
  config_lib.save_json(cfg, tmp)
  os.replace(tmp, path)


def check_config(cfg: Config, workdir: str) -> None:
  """Saves `cfg` as WORKDIR/config.json, or checks it against the one saved there.

  Raises ConfigError listing the differing fields when the WORKDIR was started with a config
  that this one may not replace (see the module docstring).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    _write_config(cfg, path)
    return
  saved = config_lib.load_json(path)
  allowed, refused = changed_fields(saved, cfg)
  if refused and not cfg.train.allow_config_change:
    raise ConfigError(
        f"{path}: this WORKDIR was started with another config; differing fields: "
        f"{'; '.join(refused)}. Rerun with the saved values, use a new --workdir, or pass "
        "--train.allow_config_change=true to continue with the new config")
  if refused:
    logging.warning("config changed on resume (train.allow_config_change): %s", "; ".join(refused))
  if allowed:
    logging.info("config changed on resume: %s", "; ".join(allowed))
  if allowed or refused:
    _write_config(cfg, path)


def rewind_metrics(path: str, step: int) -> list[dict[str, Any]]:
  """Drops records past `step` (and unreadable lines) from a metrics.jsonl; returns the rest.
  `step` -1: a fresh start, every record goes."""
  if not os.path.exists(path):
    return []
  kept, dropped = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
        kept.append(rec)
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for rec in kept:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    os.replace(tmp, path)
    if step < 0:  # a fresh start over the log of an attempt that left no checkpoint
      logging.warning("%s: no checkpoint to resume from; dropped the %d records of an earlier "
                      "attempt", path, dropped)
    else:
      logging.info("%s: dropped %d records past step %d (work lost at the interruption)", path,
                   dropped, step)
  return kept
