"""Checkpoints with orbax's CheckpointManager: the train state plus the data iterator position.

Layout: WORKDIR/checkpoints/<step>/{state,data}. `state` holds params, optimizer state,
step and RNG key as arrays; `data` is a small JSON dict (the iterator position). Orbax writes
each step to a temporary folder and renames it when complete, so a killed run leaves either
a whole checkpoint or none.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(path, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` into the structure (and shardings) of `like`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   data=ocp.args.JsonRestore()))
  leaves = jax.tree_util.tree_leaves(out.state)
  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
  return state, dict(out.data)


def restore_params(workdir: str, like_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Only the parameters of the newest (or given) checkpoint in `workdir`, for decoding."""
  mngr = manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint found; train first with "
        "python -m experiments.quickstart --workdir " + workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like_params)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item={"params": abstract}, partial_restore=True)))
  leaves = jax.tree_util.tree_leaves(out.state["params"])
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like_params), leaves), step


def load_model(workdir: str, step: int | None = None):
  """Everything decoding needs from a WORKDIR: (config, params, source vocab, target vocab, step)."""
  from s2s_jax import config as config_lib
  from s2s_jax import model
  from s2s_jax.data import pipeline

  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; is {workdir} a training WORKDIR?")
  cfg = config_lib.load_json(cfg_path)
  src_vocab, tgt_vocab = pipeline.load_vocabs(workdir)
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg.model,
                                                  len(src_vocab), len(tgt_vocab)))
  params, step = restore_params(workdir, like, step)
  return cfg, params, src_vocab, tgt_vocab, step
