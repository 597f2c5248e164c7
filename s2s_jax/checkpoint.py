"""Checkpoints with orbax's CheckpointManager: the train state, the data position, a fingerprint.

Layout: WORKDIR/checkpoints/<step>/{state,data,integrity}. `state` holds the train state as
a dict of arrays (params, optimizer state, step); `data` is a small JSON dict (the iterator
position); `integrity` is JSON: the step and two 32-bit checksums of the bits of every state leaf.

Crash safety. Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames
it to `<step>` only after every file is written (the rename is atomic on a local file
system), and only renamed folders count as checkpoints: a process killed at any moment,
also during an asynchronous save, leaves either a whole checkpoint or a temporary folder,
which the training manager deletes when it starts. Orbax copies the arrays to host memory
before `save` returns, so the train step may donate the state right after.

Integrity. Orbax stores the arrays uncompressed and unchecked: a flipped bit restores as a
wrong number without any error. `restore` therefore first compares the saved layout (every
leaf's shape and dtype) with the one asked for, then recomputes the checksums of what it read
and compares them with `integrity`. A checkpoint is corrupted (`is_corrupted`) only when that
is proven: a checksum mismatch, a missing file or item, a file whose bytes cannot be decoded.
`restore_newest` then falls back to the previous checkpoint (with a warning naming what was
wrong) and raises `CheckpointError` when none restores; any other failure (an I/O error, out
of memory, another layout) stops it at once, every checkpoint left where it was. `save`
refuses a state holding NaN or Inf; a save that fails (a full disk) is a CheckpointError at the
next save or at `wait`, and leaves the checkpoints written before as they were.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

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


class CorruptedCheckpoint(CheckpointError):
  """A checkpoint whose files are proven damaged (a checksum that does not match, say)."""


# Errors of tensorstore reading bytes that are not what was written (absl status codes), and
# of orbax missing an item of the step: the files are damaged.
_DAMAGED = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION): "
                      r"Error (reading|opening)|^'?Item \"\w+\" was not found in the checkpoint")
# Words of errors that say nothing about the files: the machine, not the checkpoint.
_TRANSIENT = re.compile(r"RESOURCE_EXHAUSTED|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|"
                        r"PERMISSION_DENIED|[Oo]ut of memory")


def _chain(e: BaseException) -> list[BaseException]:
  """`e` and the exceptions it was raised from or during."""
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def is_corrupted(e: BaseException) -> bool:
  """Whether a restore failure proves the checkpoint's files damaged: a checksum mismatch, a
  missing file, a file that cannot be decoded. An I/O error, running out of memory or any
  other failure does not (the files may be fine: try again, or fix the cause)."""
  chain = _chain(e)
  for x in chain:
    if (isinstance(x, MemoryError) or _TRANSIENT.search(str(x))
        or (isinstance(x, OSError) and not isinstance(x, FileNotFoundError))):
      return False
  return any(isinstance(x, (CorruptedCheckpoint, FileNotFoundError, json.JSONDecodeError))
             or _DAMAGED.search(str(x)) for x in chain)


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
  wait(mngr)  # an earlier save that failed stops the run here
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state),
                                            integrity=ocp.args.JsonSave(integrity)), force=True)
  except (OSError, ValueError) as e:
    raise _save_failed(mngr, e) from None


def _committed(mngr: ocp.CheckpointManager) -> list[int]:
  """The steps whose checkpoint folders exist (the manager's own list may not, after a failed
  save)."""
  folder = str(mngr.directory)
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _save_failed(mngr: ocp.CheckpointManager, e: BaseException) -> CheckpointError:
  kept = _committed(mngr)
  return CheckpointError(
      f"{mngr.directory}: writing a checkpoint failed ({_one_line(e)}); the checkpoints written "
      f"before are kept ({'newest: step ' + str(kept[-1]) if kept else 'none yet'}). Free disk "
      "space or fix the cause, then rerun the same command to resume")


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; a CheckpointError saying what was kept when
  writing it failed (a full disk, say). The half-written folder is deleted at the next start."""
  try:
    mngr.wait_until_finished()
  except (OSError, ValueError) as e:
    raise _save_failed(mngr, e) from None


def _verify(where: str, tree: Any, integrity: Any, step: int) -> None:
  """Raises CorruptedCheckpoint unless every leaf of `tree` matches the checksums saved with
  it."""
  if not isinstance(integrity, dict) or not isinstance(integrity.get("leaves"), dict):
    raise CorruptedCheckpoint(f"{where}: integrity record is missing or malformed")
  if integrity.get("step") != step:
    raise CorruptedCheckpoint(f"{where}: integrity record is for step {integrity.get('step')}")
  saved = integrity["leaves"]
  for name, (a, b, _) in fingerprint(tree).items():
    if name not in saved:
      raise CorruptedCheckpoint(f"{where}: {name} has no checksum (written by other code?)")
    if list(saved[name]) != [a, b]:
      raise CorruptedCheckpoint(f"{where}: {name} does not match the checksum written with it "
                                "(the file is corrupted)")


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path as 'a/b/0': (shape, dtype)} of a pytree of arrays or array metadata (dicts,
  lists and named tuples alike, as orbax saves them)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_layout(where: str, like: Any, prefix: str = "") -> set[str]:
  """Raises CheckpointError (not a corruption) when the saved state's leaves under `prefix`
  differ in name, shape or dtype from those of `like`, but for LEGACY_ENTRIES, whose names it
  returns. Then a checksum mismatch can only mean damaged bytes."""
  try:
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / "state")
  except (KeyError, TypeError, AttributeError) as e:  # parsed, but not orbax's metadata
    raise CorruptedCheckpoint(f"{where}/state: malformed metadata ({_one_line(e)})") from None
  saved = {k: v for k, v in _layout(getattr(meta, "tree", meta)).items()
           if k.startswith(prefix)}
  wanted = _layout(like)
  legacy = {k.split("/")[0] for k in saved if k.split("/")[0] in LEGACY_ENTRIES} - {
      k.split("/")[0] for k in wanted}
  saved = {k: v for k, v in saved.items() if k.split("/")[0] not in legacy}
  if saved != wanted:
    diffs = [f"{k}: saved {saved.get(k, 'nothing')}, this run {wanted.get(k, 'nothing')}"
             for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    raise CheckpointError(f"{where}: holds another model or optimizer state ({'; '.join(diffs[:3])}"
                          f"{' ...' if len(diffs) > 3 else ''})")
  return legacy


def restore(mngr: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` into the structure (and shardings) of `like` (a dict or a
  NamedTuple of arrays), verified against its checksums. Raises CheckpointError (or orbax's
  error) when it cannot be read."""
  target = _as_dict(like)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  sharding = jax.tree_util.tree_leaves(abstract)[0].sharding
  legacy = {k: jax.ShapeDtypeStruct(LEGACY_ENTRIES[k].shape, LEGACY_ENTRIES[k].dtype,
                                    sharding=sharding)
            for k in _check_layout(_step_dir(mngr, step), target)}
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(dict(abstract, **legacy) if legacy else abstract),
      data=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
  _verify(_step_dir(mngr, step), out.state, out.integrity, step)
  restored = {k: v for k, v in out.state.items() if k not in legacy} if legacy else out.state
  leaves = jax.tree_util.tree_leaves(restored)
  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
  if isinstance(state, dict) and "step" in state and int(state["step"]) != step:
    raise CorruptedCheckpoint(f"{_step_dir(mngr, step)}: holds the state of step "
                              f"{int(state['step'])}")
  return (type(like)(**state) if target is not like else state), dict(out.data)


def _one_line(e: BaseException, limit: int = 200) -> str:
  """The error on one line, with the one it was raised from last when there is one."""
  def line(x: BaseException) -> str:
    text = " ".join(str(x).split()) or type(x).__name__
    text = text if isinstance(x, CheckpointError) else f"{type(x).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + " ..."
  root = _chain(e)[-1]
  return line(e) if root is e else f"{line(e)} (from {line(root)})"


def _newest_usable(mngr: ocp.CheckpointManager,
                   load: Callable[[int], Any]) -> tuple[Any, int, list[int]]:
  """Tries `load(step)` from the newest step down, past corrupted checkpoints (each logged as
  a warning naming it and the reason); returns (result, step, corrupted newer steps).

  Raises CheckpointError when no step loads, or at once, naming the step and the reason,
  when a step fails for any reason other than a proven corruption (`is_corrupted`).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failures: list[tuple[int, str]] = []
  for step in steps:
    try:
      return load(step), step, [s for s, _ in failures]
    except Exception as e:  # noqa: BLE001 -- sorted below: corrupted, or stop
      reason = _one_line(e)
      if not is_corrupted(e):
        where = os.path.dirname(str(mngr.directory))
        raise CheckpointError(
            f"{_step_dir(mngr, step)}: cannot be restored ({reason}); this does not show a "
            "damaged checkpoint, so every checkpoint was left in place. If the config changed, "
            f"rerun with the saved one ({where}/config.json); otherwise fix the cause (memory, "
            "disk, permissions) and rerun") from None
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
    _check_layout(_step_dir(mngr, s), item, prefix="params/")
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
  """Everything decoding needs from a WORKDIR: (config, params, source vocab, target vocab, step).
  """
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; is {workdir} a training WORKDIR?")
  cfg = config_lib.load_json(cfg_path)
  src_vocab, tgt_vocab = pipeline.load_vocabs(workdir)
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg.model,
                                                  len(src_vocab), len(tgt_vocab)))
  params, step = restore_params(workdir, like, step)
  return cfg, params, src_vocab, tgt_vocab, step
