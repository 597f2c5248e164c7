"""Faults other than a kill: corrupted checkpoints, changed configs, NaN/Inf, bad input, no pickle.

(Kill -9 and bit-exact resume: tests/test_resume_kill.py.)
"""

import errno
import json
import logging
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_toy_corpus

from s2s_jax import checkpoint, model, train
from s2s_jax import config as config_lib
from s2s_jax import workdir as workdir_lib
from s2s_jax.config import Config, ConfigError
from s2s_jax.data import pipeline
from s2s_jax.data.vocab import EOS_ID, PAD_ID

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "s2s_jax")


# ----------------------------------------------------------------------------- fingerprints

def _reference_fingerprint(x: np.ndarray) -> tuple[int, int]:
  """The checksums of checkpoint._leaf_summary, computed independently in numpy (uint64)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint64).ravel()
  else:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    bits = np.ascontiguousarray(x).view(unsigned).astype(np.uint64).ravel()
  m = np.uint64(2**32)
  idx = np.arange(bits.size, dtype=np.uint64)
  first = int(np.sum((bits * ((2 * idx + 1) % m)) % m) % m)
  mixed = ((bits ^ (bits >> np.uint64(16))) * np.uint64(0x85EBCA6B)) % m
  second = int(np.sum(mixed ^ ((idx * np.uint64(0x9E3779B9)) % m)) % m)
  return first, second


def test_fingerprint_matches_numpy_reference_and_is_sharding_invariant():
  rng = np.random.default_rng(0)
  tree = {
      "f32": rng.normal(size=(24, 8)).astype(np.float32),
      "i32": rng.integers(-2**31, 2**31 - 1, size=(5,), dtype=np.int32),
      "key": np.asarray(jax.random.PRNGKey(7)),
      "scalar": np.float32(-0.0),
      "flag": rng.random(9) > 0.5,
      "bf16": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16),
  }
  got = checkpoint.fingerprint(tree)
  for name, leaf in tree.items():
    a, b, finite = got[f"['{name}']"]
    expect = _reference_fingerprint(np.asarray(leaf).view(np.uint16) if name == "bf16" else leaf)
    assert (a, b) == expect, name
    assert finite
  # The same bits spread over 8 devices give the same checksums (sums mod 2^32 are exact).
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(tree["f32"], jax.sharding.NamedSharding(mesh, jax.P("d")))
  assert checkpoint.fingerprint({"f32": sharded}) == {"['f32']": got["['f32']"]}


def test_fingerprint_sees_every_single_bit_flip_and_swaps():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  base = checkpoint.fingerprint([x])["[0]"][:2]
  words = x.view(np.uint32).ravel()
  for _ in range(64):
    i, bit = int(rng.integers(words.size)), int(rng.integers(32))
    flipped = words.copy()
    flipped[i] ^= np.uint32(1 << bit)
    assert checkpoint.fingerprint([flipped.view(np.float32).reshape(x.shape)])["[0]"][:2] != base
  swapped = x.copy().ravel()
  swapped[[3, 40]] = swapped[[40, 3]]
  assert checkpoint.fingerprint([swapped.reshape(x.shape)])["[0]"][:2] != base
  nan = x.copy()
  nan[2, 1] = np.nan
  assert checkpoint.fingerprint([nan])["[0]"][2] is False


# ------------------------------------------------------------------- checkpoint corruption

def _state(step: int) -> dict:
  k = jax.random.PRNGKey(step)
  return {"params": {"w": jax.random.normal(k, (64, 64)), "b": jnp.full((64,), float(step))},
          "opt_state": (jnp.asarray(step, jnp.int32),),
          "step": jnp.asarray(step, jnp.int32), "rng": k}


def _write_steps(workdir: str, steps=(1, 2, 3)) -> None:
  mngr = checkpoint.manager(workdir)
  for s in steps:
    checkpoint.save(mngr, s, _state(s), {"epoch": 0, "index": s})
  mngr.wait_until_finished()
  mngr.close()


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_byte(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _ckpt(workdir: str, step: int) -> str:
  return os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step))


def _equal_trees(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


@pytest.mark.parametrize("damage, reason", [
    ("flip", "does not match the checksum"),  # silent for orbax: only the checksum sees it
    ("truncate", "OUT_OF_RANGE: Error reading"),  # orbax's own read error
    ("remove", "Error reading"),  # an array file is missing
    ("metadata", "malformed metadata"),  # the state's metadata parses, but is not orbax's
    ("data_json", "JSONDecodeError"),  # the iterator position is unreadable
    ("data_item", 'Item "data" was not found'),  # the iterator position is gone
    ("integrity", "integrity"),  # the checksum record is gone
])
def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage, reason):
  workdir = str(tmp_path)
  _write_steps(workdir)
  state_dir = os.path.join(_ckpt(workdir, 3), "state")
  if damage == "flip":
    _flip_byte(_largest_file(state_dir))
  elif damage == "truncate":
    _truncate(_largest_file(state_dir))
  elif damage == "remove":
    os.remove(_largest_file(os.path.join(state_dir, "d")))
  elif damage == "metadata":
    meta = json.load(open(os.path.join(state_dir, "_METADATA")))
    json.dump({"tree": meta["tree_metadata"]}, open(os.path.join(state_dir, "_METADATA"), "w"))
  elif damage == "data_json":
    _truncate(os.path.join(_ckpt(workdir, 3), "data", "metadata"))
  elif damage == "data_item":
    shutil.rmtree(os.path.join(_ckpt(workdir, 3), "data"))
  else:
    os.remove(os.path.join(_ckpt(workdir, 3), "integrity", "metadata"))
  # Decoding falls back too (it reads no iterator position), and leaves the WORKDIR untouched.
  like = jax.eval_shape(lambda: _state(0)["params"])
  with caplog.at_level(logging.WARNING):
    params, step = checkpoint.restore_params(workdir, like)
  expect = 3 if damage.startswith("data") else 2
  assert step == expect and _equal_trees(params, _state(expect)["params"])
  assert os.path.isdir(_ckpt(workdir, 3))
  # Training falls back, says why, and moves the bad one aside so that step 3 can be redone.
  caplog.clear()
  mngr = checkpoint.manager(workdir)
  with caplog.at_level(logging.WARNING):
    state, data, step = checkpoint.restore_newest(mngr, _state(0))
  assert step == 2 and data["index"] == 2 and _equal_trees(state, _state(2))
  text = caplog.text
  assert f"checkpoint {_ckpt(workdir, 3)} is unusable" in text and reason in text, text
  assert sorted(mngr.all_steps()) == [1, 2]
  assert os.path.isdir(os.path.join(workdir, checkpoint.UNUSABLE_DIR, "3"))
  checkpoint.save(mngr, 3, _state(3), {"epoch": 0, "index": 3})  # the step can be written again
  mngr.wait_until_finished()
  assert checkpoint.restore_newest(mngr, _state(0))[2] == 3
  mngr.close()


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  workdir = str(tmp_path)
  _write_steps(workdir, (1, 2))
  for s in (1, 2):
    _flip_byte(_largest_file(os.path.join(_ckpt(workdir, s), "state")))
  with pytest.raises(checkpoint.CheckpointError, match=r"none of the 2 checkpoints can be restored"
                     r".*step 2: .*step 1: .*move .*checkpoints away"):
    checkpoint.restore_newest(checkpoint.manager(workdir), _state(0))
  assert os.path.isdir(_ckpt(workdir, 1)) and os.path.isdir(_ckpt(workdir, 2))  # nothing moved
  # A checkpoint of another model shape: the same error, naming the saved config.
  other = str(tmp_path / "other")
  _write_steps(other, (1,))
  bigger = _state(0)
  bigger["params"]["b"] = jnp.zeros((65,))
  with pytest.raises(checkpoint.CheckpointError, match=r"holds another model or optimizer state "
                     r"\(params/b: saved \(\(64,\), 'float32'\), this run \(\(65,\).*config.json"):
    checkpoint.restore_newest(checkpoint.manager(other), bigger)
  # another dtype, which would restore (cast) and fail the checksums: not taken for corruption
  cast = _state(0)
  cast["params"]["b"] = jnp.zeros((64,), jnp.int32)
  with pytest.raises(checkpoint.CheckpointError, match="params/b: saved .*'float32'.*'int32'"):
    checkpoint.restore_newest(checkpoint.manager(other), cast)
  assert os.listdir(os.path.join(other, checkpoint.CHECKPOINT_DIR)) == ["1"]


@pytest.mark.parametrize("fault", ["io", "oom_xla", "oom_host"])
def test_a_transient_restore_error_stops_and_moves_nothing(tmp_path, monkeypatch, fault):
  """An I/O error or running out of memory while reading a checkpoint says nothing about its
  files: training stops with the reason, every checkpoint stays where it was."""
  from orbax.checkpoint._src.serialization import serialization
  workdir = str(tmp_path)
  _write_steps(workdir)
  error = {"io": OSError(errno.EIO, "Input/output error"),
           "oom_xla": jax.errors.JaxRuntimeError(
               "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 16.00GiB."),
           "oom_host": MemoryError()}[fault]

  async def fails(*args, **kwargs):
    raise error

  monkeypatch.setattr(serialization, "_read_shard", fails)  # orbax reading an array
  listing = sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)))
  reason = {"io": "Input/output error", "oom_xla": "RESOURCE_EXHAUSTED",
            "oom_host": "MemoryError"}[fault]
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(_ckpt(workdir, 3)) +
                     f": cannot be restored .*{reason}.*every checkpoint was left in place"):
    checkpoint.restore_newest(checkpoint.manager(workdir), _state(0))
  with pytest.raises(checkpoint.CheckpointError, match="cannot be restored"):  # decoding too
    checkpoint.restore_params(workdir, jax.eval_shape(lambda: _state(0)["params"]))
  assert sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))) == listing
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNUSABLE_DIR))
  monkeypatch.undo()  # the fault is gone: the newest checkpoint restores
  assert checkpoint.restore_newest(checkpoint.manager(workdir), _state(0))[2] == 3


def test_save_refuses_nan_or_inf(tmp_path):
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 1, _state(1), {})
  bad = _state(2)
  bad["params"]["w"] = bad["params"]["w"].at[3, 4].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=r"step 2: NaN or Inf in \['params'\]\['w'\].*"
                     r"newest checkpoint is step 1"):
    checkpoint.save(mngr, 2, bad, {})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1]
  mngr.close()
  assert sorted(os.listdir(os.path.join(str(tmp_path), checkpoint.CHECKPOINT_DIR))) == ["1"]


def test_interrupted_save_leaves_no_complete_looking_checkpoint(tmp_path):
  """What a SIGKILL during an async save leaves (a temporary folder) is not a checkpoint, and
  the next training start deletes it."""
  workdir = str(tmp_path)
  _write_steps(workdir, (1,))
  partial = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "2.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "_METADATA"), "w").write("{")
  mngr = checkpoint.manager(workdir)
  assert mngr.all_steps() == [1]
  assert checkpoint.restore_newest(mngr, _state(0))[2] == 1
  mngr.wait_until_finished()
  mngr.close()
  assert not os.path.exists(partial)


def test_a_full_disk_on_save_stops_and_keeps_the_checkpoints(tmp_path, toy_corpus, monkeypatch,
                                                              capsys):
  """The save of step 4 fails with ENOSPC: the run stops with one line saying so, checkpoint 2
  is intact, and the same command resumes from it once there is room."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  workdir = str(tmp_path / "w")
  real = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):
    if f"{os.sep}4.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, x, directory)

  preset = _tiny(toy_corpus, num_steps=6, checkpoint_every=2, log_every=2, keep_checkpoints=1)
  with monkeypatch.context() as m:
    m.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    rc, err = _run_cli(lambda a: train.main(preset, a), ["--workdir", workdir], capsys)
  assert rc == 1
  assert err.strip().splitlines()[-1].startswith(
      f"error: {os.path.join(workdir, 'checkpoints')}: writing a checkpoint failed (OSError: "
      "[Errno 28] No space left on device"), err[-3000:]
  assert err.strip().splitlines()[-1].endswith(
      "the checkpoints written before are kept (newest: step 2). Free disk space or fix the "
      "cause, then rerun the same command to resume")
  assert _committed_steps(workdir) == [2]  # keep_checkpoints=1 deleted nothing for step 4
  rc, err = _run_cli(lambda a: train.main(preset, a), ["--workdir", workdir], capsys)
  assert rc == 0 and "resumed from checkpoint at step 2 " in err, err[-3000:]
  assert _committed_steps(workdir) == [6]


def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path, toy_corpus):
  """SIGTERM (a preemption notice) after step 3: the run ends the step, writes a checkpoint and
  returns; the same call then continues to what an uninterrupted run gives."""
  run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
  cfg = _tiny(toy_corpus, num_steps=6, checkpoint_every=0, log_every=3)
  preempt = lambda t: t.step == 3 and os.kill(os.getpid(), signal.SIGTERM)
  result = train.train(cfg, run, progress=False, hooks=[(preempt, 1)])
  assert result["interrupted"] and result["step"] == 3 and _committed_steps(run) == [3]
  assert train.train(cfg, run, progress=False)["step"] == 6
  train.train(cfg, ref, progress=False)
  assert _checkpoint_integrity(run, 6) == _checkpoint_integrity(ref, 6)
  metrics = lambda w: [{k: v for k, v in json.loads(line).items() if k != "words_per_s"}
                       for line in open(os.path.join(w, "metrics.jsonl"))]
  assert metrics(run) == metrics(ref)


def _committed_steps(workdir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
                if n.isdigit())


# ----------------------------------------------------------------------------- config

def _tiny(corpus: str, **train_fields) -> Config:
  cfg = config_lib.override(Config(), {
      "data.source": "text", "data.path": corpus, "data.tokenizer": "none",
      "data.bucket_width": 8, "model.hidden_size": 8, "model.embed_size": 8,
      "model.num_layers": 1, "train.batch_size": 8, "train.eval_every": 0,
      "train.eval_batch_size": 64, "data.max_eval_sentences": 16, "parallel.data": 1})
  return config_lib.override(cfg, {f"train.{k}": v for k, v in train_fields.items()})


def test_config_check_on_resume(tmp_path, caplog):
  workdir = str(tmp_path)
  path = os.path.join(workdir, "config.json")
  cfg = _tiny("corpus", num_steps=10)
  workdir_lib.check_config(cfg, workdir)
  assert config_lib.load_json(path) == cfg
  # Resume-safe fields may change; config.json then records the new values.
  longer = config_lib.override(cfg, {"train.num_steps": 20, "train.log_every": 5,
                                     "decode.beam_size": 2, "data.path": "moved"})
  workdir_lib.check_config(longer, workdir)
  assert config_lib.load_json(path) == longer
  # Another model shape or vocabulary: refused, listing exactly the differing fields.
  other = config_lib.override(longer, {"model.hidden_size": 16, "data.src_vocab_size": 50,
                                       "train.num_steps": 30})
  with pytest.raises(ConfigError) as e:
    workdir_lib.check_config(other, workdir)
  msg = str(e.value)
  assert msg.startswith(path) and "\n" not in msg
  assert "model.hidden_size: 8 -> 16" in msg and "data.src_vocab_size: 160000 -> 50" in msg
  assert "num_steps" not in msg and "--train.allow_config_change=true" in msg
  assert config_lib.load_json(path) == longer  # untouched
  # ... unless explicitly allowed.
  allowed = config_lib.override(other, {"train.allow_config_change": True})
  with caplog.at_level(logging.WARNING):
    workdir_lib.check_config(allowed, workdir)
  assert "model.hidden_size: 8 -> 16" in caplog.text
  assert config_lib.load_json(path) == allowed
  # A damaged config.json is named with its line.
  open(path, "w").write('{"model": {"hidden_size": 8,,}}\n')
  with pytest.raises(ConfigError, match=re.escape(path) + ": line 1: not valid JSON"):
    workdir_lib.check_config(cfg, workdir)


def test_rewind_metrics_drops_records_past_the_restored_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  lines = [{"kind": "train", "step": 10}, {"kind": "valid", "step": 10},
           {"kind": "train", "step": 20}, {"kind": "valid", "step": 20}]
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')
  assert workdir_lib.rewind_metrics(path, 10) == lines[:2]
  assert [json.loads(line) for line in open(path)] == lines[:2]
  assert workdir_lib.rewind_metrics(path, -1) == [] and open(path).read() == ""


# ----------------------------------------------------------------------- non-finite steps

POISON = "poison"  # a target word whose planted output bias makes its loss overflow float32
POISON_BIAS = -3e38  # log p(poison) is about -3e38: two of them sum to -inf


def _poisoned_corpus(folder: str, calls: set[int]) -> tuple[str, int]:
  """The toy corpus, each training pair once, with every word of two target sentences in each
  of the training batches drawn at `calls` (1-based, settings of `_tiny`) replaced by POISON.
  The batches stay the same (they depend only on the sentence lengths). Returns (folder,
  POISON's target id)."""
  corpus = write_toy_corpus(folder)
  paths = [os.path.join(corpus, f"train.{lang}") for lang in ("en", "fr")]
  pairs = dict.fromkeys(zip(*(open(p).read().splitlines() for p in paths)))  # known by text
  for k, p in enumerate(paths):
    open(p, "w").write("".join(pair[k] + "\n" for pair in pairs))
  cfg = _tiny(corpus)
  data = pipeline.load_corpus(cfg.data, None)
  batches = pipeline.BatchIterator(data.examples["train"], cfg.train.batch_size,
                                   cfg.data.bucket_width, cfg.train.seed, cfg.data.bucket_growth)
  lines = [pair[1] for pair in pairs]
  for call in range(1, max(calls) + 1):
    tgt = next(batches)["tgt"]
    if call not in calls:
      continue
    texts = [" ".join(data.tgt_vocab.decode([t for t in row if t not in (PAD_ID, EOS_ID)]))
             for row in tgt]
    for text in texts[:2]:
      lines[lines.index(text)] = " ".join([POISON] * len(text.split()))
  open(paths[1], "w").write("".join(line + "\n" for line in lines))
  return corpus, pipeline.load_corpus(cfg.data, None).tgt_vocab.id_of(POISON)


def _plant_bias(monkeypatch, poison_id: int) -> None:
  """Starts every model with the output bias of POISON at POISON_BIAS: a finite parameter,
  but a batch with POISON as a target twice has a loss of -inf (its probability in the other
  batches is exactly 0: their gradient leaves the bias as it is)."""
  real = model.init_params

  def init(*args, **kwargs):
    params = real(*args, **kwargs)
    bias = params["softmax"]["b"].at[poison_id].set(POISON_BIAS)
    return dict(params, softmax=dict(params["softmax"], b=bias))

  monkeypatch.setattr(model, "init_params", init)


def _skip_batches(monkeypatch, calls: set[int]) -> None:
  """Makes the training batch iterator pass over the batches of the given calls (1-based)."""
  original = pipeline.BatchIterator.__next__
  count = [0]

  def patched(self):
    batch = original(self)
    count[0] += 1
    return patched(self) if count[0] in calls else batch

  monkeypatch.setattr(pipeline.BatchIterator, "__next__", patched)


def _checkpoint_integrity(workdir: str, step: int) -> dict:
  with open(os.path.join(_ckpt(workdir, step), "integrity", "metadata")) as f:
    leaves = json.load(f)["leaves"]
  return {k: v for k, v in leaves.items() if not k.startswith("['step']")}


@pytest.mark.parametrize("kernels", ["auto", "plain"])  # plain: the path GPUs and TPUs run
def test_poisoned_batch_is_skipped_exactly(tmp_path, monkeypatch, caplog, kernels):
  """Two batches whose loss overflows float32 change nothing: the result equals a run that
  never saw them."""
  corpus, poison_id = _poisoned_corpus(str(tmp_path / "corpus"), {4, 5})
  _plant_bias(monkeypatch, poison_id)
  cfg = config_lib.override(_tiny(corpus, num_steps=12, checkpoint_every=0, log_every=4),
                            {"model.kernels": kernels})
  with caplog.at_level(logging.WARNING):
    train.train(cfg, str(tmp_path / "poisoned"), progress=False)
  assert "step 4: non-finite loss or gradient; update skipped (epoch 0, batch 3)" in caplog.text
  assert "step 5: non-finite loss or gradient; update skipped (epoch 0, batch 4)" in caplog.text
  assert "non-finite" not in caplog.text.replace("step 4: non", "").replace("step 5: non", "")
  records = [json.loads(line) for line in open(tmp_path / "poisoned" / "metrics.jsonl")]
  train_recs = [r for r in records if r["kind"] == "train"]
  assert [r["skipped_steps"] for r in train_recs] == [1, 1, 0]
  assert all(np.isfinite(r["loss"]) for r in train_recs)

  with monkeypatch.context() as m:
    _skip_batches(m, {4, 5})
    train.train(config_lib.override(cfg, {"train.num_steps": 10}), str(tmp_path / "clean"),
                progress=False)
  # Params and optimizer state; the schedule's step count follows the steps, skipped ones too.
  without_count = lambda leaves: {k: v for k, v in leaves.items() if not k.endswith(".count")}
  assert (without_count(_checkpoint_integrity(str(tmp_path / "poisoned"), 12))
          == without_count(_checkpoint_integrity(str(tmp_path / "clean"), 10)))
  a = checkpoint.load_model(str(tmp_path / "poisoned"))[1]
  b = checkpoint.load_model(str(tmp_path / "clean"))[1]
  assert _equal_trees(a, b) and float(a["softmax"]["b"][poison_id]) == np.float32(POISON_BIAS)


def test_too_many_bad_steps_stop_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "w")
  corpus, poison_id = _poisoned_corpus(str(tmp_path / "corpus"), {4, 5, 6})
  _plant_bias(monkeypatch, poison_id)
  rc, err = _run_cli(lambda a: train.main(_tiny(corpus), a), [
      "--workdir", workdir, "--train.num_steps=12", "--train.checkpoint_every=2",
      "--train.max_bad_steps=3"], capsys)
  assert rc == 1
  assert err.strip().splitlines()[-1] == (
      "error: 3 consecutive non-finite steps ending at step 6; "
      "lower optim.learning_rate or check the data"), err[-2000:]
  assert "Traceback" not in err
  for step, batch in ((4, 3), (5, 4), (6, 5)):
    assert (f"step {step}: non-finite loss or gradient; update skipped "
            f"(epoch 0, batch {batch})") in err
  # Checkpoints are finite and hold the last good state (step 4's is step 3's result); the
  # flags are checked before each save, so the third bad step stops the run before step 6's.
  mngr = checkpoint.manager(workdir, read_only=True)
  assert sorted(mngr.all_steps()) == [2, 4]
  assert _checkpoint_integrity(workdir, 4) != _checkpoint_integrity(workdir, 2)


# --------------------------------------------------------------------- bad input, CLI level

def _cli(argv, capsys) -> tuple[int, str]:
  return _run_cli(lambda a: train.main(Config(), a), argv, capsys)


def _run_cli(main, argv, capsys) -> tuple[int, str]:
  """main(argv) and its stderr; the root logging handlers it replaces are put back."""
  handlers, level = logging.root.handlers[:], logging.root.level
  try:
    rc = main(argv)
  finally:
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
  return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
  lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  return lines[0]


def test_cli_config_errors(tmp_path, capsys):
  rc, err = _cli(["--workdir", str(tmp_path), "--model.hiden_size=3"], capsys)
  assert rc == 2 and "unknown config field 'model.hiden_size'" in _one_error_line(err)
  assert "model.hidden_size" in err  # the suggestion
  rc, err = _cli(["--workdir", str(tmp_path), "--model.hidden_size=big"], capsys)
  assert rc == 2 and "bad value 'big' for model.hidden_size" in _one_error_line(err)
  rc, err = _cli(["--model.hidden_size=8"], capsys)
  assert rc == 2 and "--workdir DIR is required" in _one_error_line(err)


@pytest.mark.parametrize("fault, expect", [
    ("missing", r"train\.fr.*(not found|does not exist|no such)"),
    ("lines", r"train\.en.*\b600\b.*train\.fr.*\b599\b"),
    ("utf8", r"train\.fr.*line 3\b.*UTF-8"),
])
def test_cli_corpus_errors(tmp_path, capsys, fault, expect):
  corpus = write_toy_corpus(str(tmp_path / "corpus"))
  fr = os.path.join(corpus, "train.fr")
  if fault == "missing":
    os.remove(fr)
  elif fault == "lines":
    lines = open(fr).readlines()
    open(fr, "w").writelines(lines[:-1])
  else:
    lines = open(fr, "rb").read().split(b"\n")
    lines[2] = b"f1 \xff\xfe f2"
    open(fr, "wb").write(b"\n".join(lines))
  rc, err = _cli(["--workdir", str(tmp_path / "w"), "--data.source=text",
                  f"--data.path={corpus}", "--data.tokenizer=none"], capsys)
  assert rc == 1
  assert re.search(expect, _one_error_line(err), re.IGNORECASE), err[-1500:]


def test_cli_batch_size_not_divisible_by_devices(tmp_path, toy_corpus, capsys):
  rc, err = _cli(["--workdir", str(tmp_path), "--data.source=text", f"--data.path={toy_corpus}",
                  "--data.tokenizer=none", "--train.batch_size=7", "--parallel.data=8"], capsys)
  assert rc == 2
  line = _one_error_line(err)
  assert "train.batch_size" in line and "7" in line and "8" in line, line


def test_cli_refuses_changed_config(tmp_path, toy_corpus, capsys):
  workdir = str(tmp_path)
  workdir_lib.check_config(_tiny(toy_corpus), workdir)  # as a first run would have saved it
  rc, err = _cli(["--workdir", workdir, "--data.source=text", f"--data.path={toy_corpus}",
                  "--model.hidden_size=32"], capsys)
  assert rc == 2
  assert "differing fields: " in _one_error_line(err) and "model.hidden_size: 8 -> 32" in err


# ----------------------------------------------------------------- nothing loads code

def test_loading_never_unpickles_or_evaluates():
  """Configs are JSON, vocabularies text, checkpoints orbax arrays: no pickle, eval or exec."""
  forbidden = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|\bcloudpickle\b|\bdill\b|"
                         r"\bmarshal\b|(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.load\(|"
                         r"\btorch\.load\b|\bjoblib\b|\bshelve\b")
  hits = []
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
          if forbidden.search(line.split("#")[0]):
            hits.append(f"{path}:{n}: {line.strip()}")
  assert not hits, hits
  assert "np.load(" not in "".join(open(os.path.join(PACKAGE, "checkpoint.py")).read())


# ------------------------------------------------------- decoding CLIs (translate, rescore)

@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_corpus) -> str:
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train(_tiny(toy_corpus, num_steps=2, checkpoint_every=0, log_every=1), workdir,
              progress=False)
  return workdir


@pytest.mark.parametrize("other", ["same size", "smaller"])
def test_resume_with_another_corpus_is_a_clean_error(tmp_path, trained, toy_corpus, capsys,
                                                     other):
  """The checkpoint's data position names its corpus by content: another one, of the same size
  or not, is refused with one line naming both."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  folder = str(tmp_path / "other")
  if other == "smaller":
    write_toy_corpus(folder, sizes=(("train", 300), ("valid", 60), ("test", 60)))
  else:
    write_toy_corpus(folder, seed=1)
  preset = _tiny(toy_corpus, num_steps=4, checkpoint_every=0, log_every=1)
  rc, err = _run_cli(lambda a: train.main(preset, a), ["--workdir", workdir,
                                                       f"--data.path={folder}"], capsys)
  assert rc == 1
  line = _one_error_line(err)
  assert re.fullmatch(
      f"error: {os.path.join(workdir, 'checkpoints', '2')}: trained on the corpus {toy_corpus} "
      rf"\(content key \w{{20}}\), but this run reads {folder} \(content key \w{{20}}\); resume "
      "with the original corpus, or use a new --workdir", line), line


def test_resume_finds_the_same_corpus_anywhere_and_old_checkpoints_resume(
    tmp_path, trained, toy_corpus, capsys):
  workdir, moved = str(tmp_path / "w"), str(tmp_path / "moved")
  shutil.copytree(trained, workdir)
  shutil.copytree(toy_corpus, moved)
  preset = _tiny(toy_corpus, checkpoint_every=0, log_every=1)
  rc, err = _run_cli(lambda a: train.main(preset, a), ["--workdir", workdir,
                     f"--data.path={moved}", "--train.num_steps=3"], capsys)
  assert rc == 0 and "resumed from checkpoint at step 2 " in err, err[-2000:]
  # A checkpoint written before the corpus was named in it: checked by its size only.
  path = os.path.join(_ckpt(workdir, 3), "data", "metadata")
  data = json.load(open(path))
  assert data.pop("corpus") and data.pop("corpus_name") == moved
  json.dump(data, open(path, "w"))
  rc, err = _run_cli(lambda a: train.main(preset, a), ["--workdir", workdir,
                                                       "--train.num_steps=4"], capsys)
  assert rc == 0 and "resumed from checkpoint at step 3 " in err, err[-2000:]


def test_translate_without_checkpoint_is_a_clean_error(tmp_path, trained, capsys):
  from s2s_jax import translate
  empty = str(tmp_path / "no_ckpt")
  os.makedirs(empty)
  for name in ("config.json", pipeline.SRC_VOCAB_FILE, pipeline.TGT_VOCAB_FILE):
    shutil.copy(os.path.join(trained, name), empty)
  src = tmp_path / "in.txt"
  src.write_text("w1 w2\n")
  rc, err = _run_cli(translate.main, ["--workdir", empty, "--input", str(src)], capsys)
  assert rc == 1 and "no checkpoint found" in _one_error_line(err)
  rc, err = _run_cli(translate.main, ["--workdir", str(tmp_path / "nowhere"), "--input",
                                      str(src)], capsys)
  assert rc == 1 and "config.json" in _one_error_line(err)


def test_translate_long_and_empty_inputs_keep_line_counts(tmp_path, trained, capsys):
  from s2s_jax import translate
  src, out = tmp_path / "in.txt", tmp_path / "out.txt"
  src.write_text("w1 w2\n\n" + " ".join(f"w{i % 12}" for i in range(400)) + "\nw4\n")
  rc, err = _run_cli(translate.main, ["--workdir", trained, "--input", str(src), "--output",
                                      str(out), "--beam_size", "2", "--max_input_len", "30"],
                     capsys)
  assert rc == 0, err[-2000:]
  assert len(out.read_text().split("\n")) - 1 == 4
  assert out.read_text().split("\n")[1] == ""  # an empty line gives an empty line
  assert "line 3: 400 source tokens; truncated to the first 30" in err
  src.write_text("")
  rc, err = _run_cli(translate.main, ["--workdir", trained, "--input", str(src), "--output",
                                      str(out)], capsys)
  assert rc == 0 and out.read_text() == "", err[-2000:]


def test_rescore_malformed_nbest_line_is_a_clean_error(tmp_path, trained, capsys):
  from s2s_jax import rescore
  src, nbest = tmp_path / "src.txt", tmp_path / "list.nbest"
  src.write_text("w1 w2\nw3\n")
  nbest.write_text("0 ||| f1 f2 ||| lm= -1 ||| -2.5\n1 ||| f3 ||| lm= -1\n")
  rc, err = _run_cli(rescore.main, ["--workdir", trained, "--src", str(src), "--nbest",
                                    str(nbest)], capsys)
  assert rc == 1
  line = _one_error_line(err)
  assert f"{nbest}: line 2: expected 'id ||| hypothesis ||| features ||| score'" in line
  nbest.write_text("")
  rc, err = _run_cli(rescore.main, ["--workdir", trained, "--src", str(src), "--nbest",
                                    str(nbest)], capsys)
  assert rc == 1 and f"{nbest}: no n-best entries" in _one_error_line(err)
