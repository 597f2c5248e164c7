"""Checkpoints with orbax's CheckpointManager: the train state, the data position, a fingerprint.

Layout: WORKDIR/checkpoints/<step>/{state,data,integrity}. `state` holds the train state as
a dict of arrays (params, optimizer state, step); `data` is a small JSON dict (the iterator position);
`integrity` is JSON: the step and two 32-bit checksums of the bits of every state leaf.

Crash safety. Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames
it to `<step>` only after every file is written (the rename is atomic on a local file
system), and only renamed folders count as checkpoints: a process killed at any moment,
also during an asynchronous save, leaves either a whole checkpoint or a temporary folder,
which the training manager deletes when it starts. Orbax copies the arrays to host memory
before `save` returns, so the train step may donate the state right after.

Integrity. Orbax stores the arrays uncompressed and unchecked: a flipped bit restores as a
wrong number without any error. `restore` therefore recomputes the checksums of what it
read and compares them with `integrity`; `restore_newest` falls back to the previous
checkpoint (with a warning naming what was wrong) when the newest cannot be read or does not
match, and raises `CheckpointError` when none can. `save` refuses a state holding NaN or Inf.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from s2s_jax import config as config_lib
from s2s_jax import model
from s2s_jax.data import pipeline

CHECKPOINT_DIR = "checkpoints"
UNUSABLE_DIR = "checkpoints_unusable"  # where training moves checkpoints that failed to restore


# Top-level state entries that earlier versions saved and nothing reads any more (an unused RNG
# key): restored with the rest, so that the checksums still verify, then dropped.
LEGACY_ENTRIES = {"rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message names it and says what to do."""


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of WORKDIR/checkpoints. Training's deletes the temporary folders of saves
  that never completed, and old checkpoints beyond `keep`; a `read_only` one (decoding) is
  only ever asked to restore: it creates, cleans and deletes nothing, so it is safe next to
  a running training."""
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                         create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(path, options=options)


def _leaf_bits(x: jax.Array) -> jax.Array:
  """Every element's bits as uint32 words (8-byte types give two words per element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width < 4:
    narrow = {1: jnp.uint8, 2: jnp.uint16}[width]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of bits * (2i+1), sum of mixed bits, all finite) with uint32 wrap-around.

  The first sum changes whenever any single word changes (2i+1 is odd, so invertible mod
  2^32); the second is an independent mix. Sums mod 2^32 do not depend on the reduction
  order, so the result is the same on any device count or sharding.
  """
  bits = _leaf_bits(x)
  idx = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[d]
  first = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  mixed = (bits ^ (bits >> 16)) * jnp.uint32(0x85EBCA6B)
  second = jnp.sum(mixed ^ (idx * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return first, second, finite


_summaries = jax.jit(lambda leaves: [_leaf_summary(x) for x in leaves])


def fingerprint(tree: Any) -> dict[str, tuple[int, int, bool]]:
  """{leaf path: (checksum, checksum, all finite)} of a pytree of arrays, computed on device."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_summaries([x for _, x in flat]))
  return {jax.tree_util.keystr(path): (int(a), int(b), bool(f))
          for (path, _), (a, b, f) in zip(flat, sums)}


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _as_dict(tree: Any) -> Any:
  """A NamedTuple train state as the dict checkpoints hold (anything else as it is)."""
  return tree._asdict() if isinstance(tree, tuple) and hasattr(tree, "_asdict") else tree


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Starts writing checkpoint `step` (asynchronously). Raises FloatingPointError, writing
  nothing, when the state holds NaN or Inf."""
  state = _as_dict(state)
  sums = fingerprint(state)
  bad = [name for name, (_, _, finite) in sums.items() if not finite]
  if bad:
    mngr.wait_until_finished()
    raise FloatingPointError(
        f"step {step}: NaN or Inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
        f"checkpoint not written (the newest checkpoint is step {mngr.latest_step()}): "
        "lower optim.learning_rate or check the data, then rerun to resume from it")
  integrity = {"step": int(step), "leaves": {k: [a, b] for k, (a, b, _) in sums.items()}}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state),
                                          integrity=ocp.args.JsonSave(integrity)), force=True)


def _verify(where: str, tree: Any, integrity: Any, step: int) -> None:
  """Raises CheckpointError unless every leaf of `tree` matches the checksums saved with it."""
  if not isinstance(integrity, dict) or not isinstance(integrity.get("leaves"), dict):
    raise CheckpointError(f"{where}: integrity record is missing or malformed")
  if integrity.get("step") != step:
    raise CheckpointError(f"{where}: integrity record is for step {integrity.get('step')}")
  saved = integrity["leaves"]
  for name, (a, b, _) in fingerprint(tree).items():
    if name not in saved:
      raise CheckpointError(f"{where}: {name} has no checksum (written by other code?)")
    if list(saved[name]) != [a, b]:
      raise CheckpointError(f"{where}: {name} does not match the checksum written with it "
                            "(the file is corrupted)")


def restore(mngr: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` into the structure (and shardings) of `like` (a dict or a
  NamedTuple of arrays), verified against its checksums. Raises CheckpointError (or orbax's
  error) when it cannot be read."""
  target = _as_dict(like)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  legacy = {}
  if isinstance(target, dict):
    saved = mngr.item_metadata(step).state
    saved = getattr(saved, "tree", saved)
    sharding = jax.tree_util.tree_leaves(abstract)[0].sharding
    legacy = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
              for k, v in LEGACY_ENTRIES.items() if k in (saved or {}) and k not in target}
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(dict(abstract, **legacy) if legacy else abstract),
      data=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
  _verify(_step_dir(mngr, step), out.state, out.integrity, step)
  restored = {k: v for k, v in out.state.items() if k not in legacy} if legacy else out.state
  leaves = jax.tree_util.tree_leaves(restored)
  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
  if isinstance(state, dict) and "step" in state and int(state["step"]) != step:
    raise CheckpointError(f"{_step_dir(mngr, step)}: holds the state of step {int(state['step'])}")
  return (type(like)(**state) if target is not like else state), dict(out.data)


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  text = text if isinstance(e, CheckpointError) else f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _newest_usable(mngr: ocp.CheckpointManager,
                   load: Callable[[int], Any]) -> tuple[Any, int, list[int]]:
  """Tries `load(step)` from the newest step down; returns (result, step, failed newer steps).

  Every failure is logged as a warning naming the checkpoint and the reason. Raises
  CheckpointError when no step loads.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failures: list[tuple[int, str]] = []
  for step in steps:
    try:
      return load(step), step, [s for s, _ in failures]
    except Exception as e:  # noqa: BLE001 -- any failure to read makes the checkpoint unusable
      reason = _one_line(e)
      failures.append((step, reason))
      logging.warning("checkpoint %s is unusable (%s); trying the previous one",
                      _step_dir(mngr, step), reason)
  where = str(mngr.directory)
  details = "; ".join(f"step {s}: {r}" for s, r in failures)
  raise CheckpointError(
      f"{where}: none of the {len(steps)} checkpoints can be restored ({details}). If the "
      f"config changed, rerun with the saved one ({os.path.dirname(where)}/config.json); to "
      f"start over, move {where} away (or use a new --workdir)")


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
  """Moves an unusable checkpoint to WORKDIR/checkpoints_unusable/ so its step can be redone."""
  src = _step_dir(mngr, step)
  dest_dir = os.path.join(os.path.dirname(str(mngr.directory)), UNUSABLE_DIR)
  os.makedirs(dest_dir, exist_ok=True)
  dest, n = os.path.join(dest_dir, str(step)), 1
  while os.path.exists(dest):
    dest, n = os.path.join(dest_dir, f"{step}-{n}"), n + 1
  os.replace(src, dest)
  logging.warning("moved the unusable checkpoint %s to %s; training continues from an older "
                  "one and will redo step %d", src, dest, step)


def restore_newest(mngr: ocp.CheckpointManager, like: Any) -> tuple[Any, dict, int] | None:
  """(state, data state, step) of the newest checkpoint that restores and verifies; None when
  there is none. Newer unusable checkpoints are moved aside (see `_set_aside`); when every
  checkpoint is unusable this raises CheckpointError and moves nothing."""
  if not mngr.all_steps():
    return None
  (state, data), step, failed = _newest_usable(mngr, lambda s: restore(mngr, s, like))
  if failed:
    if jax.process_index() == 0:
      for bad in failed:
        _set_aside(mngr, bad)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("s2s_jax: unusable checkpoints set aside")
    mngr.reload()
  return state, data, step


def restore_params(workdir: str, like_params: Any, step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[Any, int]:
  """Only the parameters of the newest usable (or the given) checkpoint in `workdir`, verified
  against their checksums, for decoding. Never modifies the WORKDIR. `sharding`: where every
  parameter goes (default: this process's first device; on many hosts pass a replicated
  NamedSharding, e.g. parallel.devices.replicated(mesh))."""
  mngr = manager(workdir, read_only=True)
  if not mngr.all_steps():
    raise FileNotFoundError(
        f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint found; train first with "
        "python -m experiments.quickstart --workdir " + workdir)
  device = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like_params)
  treedef = jax.tree_util.tree_structure(like_params)

  def load(s: int) -> Any:
    item = {"params": abstract}
    out = mngr.restore(s, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True),
        integrity=ocp.args.JsonRestore()))
    params = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(out.state["params"]))
    integrity = out.integrity
    if isinstance(integrity, dict) and isinstance(integrity.get("leaves"), dict):
      integrity = dict(integrity, leaves={k: v for k, v in integrity["leaves"].items()
                                          if k.startswith("['params']")})
    _verify(_step_dir(mngr, s), {"params": params}, integrity, s)
    return params

  if step is not None:
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"{_step_dir(mngr, step)}: no checkpoint for step {step}; "
                              f"available: {sorted(mngr.all_steps())}")
    return load(step), step
  params, step, _ = _newest_usable(mngr, load)
  return params, step


def load_model(workdir: str, step: int | None = None):
  """Everything decoding needs from a WORKDIR: (config, params, source vocab, target vocab, step)."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; is {workdir} a training WORKDIR?")
  cfg = config_lib.load_json(cfg_path)
  src_vocab, tgt_vocab = pipeline.load_vocabs(workdir)
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg.model,
                                                  len(src_vocab), len(tgt_vocab)))
  params, step = restore_params(workdir, like, step)
  return cfg, params, src_vocab, tgt_vocab, step
