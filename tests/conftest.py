"""Test setup: 8 virtual CPU devices (before JAX starts) and a tiny parallel corpus."""

import os
import random

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, shared with the subprocesses tests start:
# many tests compile the same small programs again (each train.train call builds its own jitted
# step), and XLA's CPU compiles are most of their time on a 2-core machine.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="s2s_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Prepared corpora (s2s_jax.data.prepared) go to a data store of the session, never ~/.cache;
# under pytest-xdist each worker gets its own folder in it (tests count what a store holds).
if "S2S_JAX_DATA" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _store = tempfile.mkdtemp(prefix="s2s_jax_test_data_")
  atexit.register(shutil.rmtree, _store, ignore_errors=True)
  os.environ["S2S_JAX_DATA"] = os.environ["S2S_JAX_TEST_DATA"] = _store
if os.environ.get("S2S_JAX_TEST_DATA") and os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ["S2S_JAX_DATA"] = os.path.join(os.environ["S2S_JAX_TEST_DATA"],
                                            os.environ["PYTEST_XDIST_WORKER"])
  os.makedirs(os.environ["S2S_JAX_DATA"], exist_ok=True)

import pytest  # noqa: E402


def corpora(store) -> list[str]:
  """The prepared corpora (and SentencePiece folders) in a data store, without its hash file."""
  return sorted(d for d in os.listdir(store) if d != "text-hashes.json")


def write_toy_corpus(folder: str, sizes=(("train", 600), ("valid", 60), ("test", 60)),
                     seed: int = 0, num_words: int = 12) -> str:
  """A tiny word-for-word 'translation' task (w3 w7 -> f3 f7) as a text-source folder."""
  rng = random.Random(seed)
  os.makedirs(folder, exist_ok=True)
  for split, n in sizes:
    with open(os.path.join(folder, f"{split}.en"), "w") as fe, \
         open(os.path.join(folder, f"{split}.fr"), "w") as ff:
      for _ in range(n):
        words = [f"w{rng.randrange(num_words)}" for _ in range(rng.randint(1, 6))]
        fe.write(" ".join(words) + "\n")
        ff.write(" ".join("f" + w[1:] for w in words) + "\n")
  return folder


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> str:
  return write_toy_corpus(str(tmp_path_factory.mktemp("toy_corpus")))
