"""The WORKDIR's files: the saved config and the metrics log (metrics.jsonl and TensorBoard).

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
from s2s_jax import hardware
from s2s_jax.config import Config, ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"  # one JSON object per line
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files of the same metrics

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


def resolve_compute_dtype(cfg: Config, workdir: str) -> Config:
  """Turns model.compute_dtype=auto into float32 or bfloat16.

  A resumed run keeps the dtype it started with (WORKDIR/config.json), so that its resume stays
  bit-exact on another machine; a new run takes `hardware.native_bf16_dtype()`. The resolved
  value is what config.json records.
  """
  if cfg.model.compute_dtype != "auto":
    return cfg
  saved_path = os.path.join(workdir, CONFIG_FILE)
  saved = (config_lib.load_json(saved_path).model.compute_dtype
           if os.path.exists(saved_path) else "auto")
  if saved != "auto":
    dtype, why = saved, f"as the run started, {saved_path}"
  else:
    dtype, why = hardware.native_bf16_dtype()
  logging.info("model.compute_dtype=auto: %s (%s)", dtype, why)
  return config_lib.override(cfg, {"model.compute_dtype": dtype})


class MetricsWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl and writes the same numbers as
  TensorBoard scalars (tag "<kind>/<field>") to event files in WORKDIR/tensorboard (when
  tensorboardX is installed).

  `resume_step`: the restored checkpoint's step (None: a fresh start). TensorBoard then hides
  every event logged after it by an earlier, interrupted run (its purge_step), as
  `rewind_metrics` drops those lines from metrics.jsonl.
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
      try:
        import tensorboardX
      except ImportError:  # metrics.jsonl alone: a machine without the optional package
        logging.warning("no TensorBoard event files (pip install tensorboardX); the metrics "
                        "are in %s", self.path)
        self._tb = False
      else:
        self._tb = tensorboardX.SummaryWriter(self.tensorboard_dir, flush_secs=30,
                                              purge_step=self._purge_step)
    if self._tb is False:
      return
    kind = record.get("kind", "metrics")
    for key, value in record.items():
      if key in ("kind", "step") or isinstance(value, bool):
        continue
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f"{kind}/{key}", value, int(record["step"]))
    self._tb.flush()  # records come every train.log_every steps: cheap, and nothing is lost

  def close(self) -> None:
    if self._tb not in (None, False):
      self._tb.close()
    self._tb = None
