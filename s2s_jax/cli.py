"""What every command line shares: process setup (host memory, logging, the compilation
cache) and the one error policy.

    sys.exit(cli.run(main, argv))

`run` sets the process up, then calls `main(argv)`. The program's own diagnoses (a bad config
value, a bad input file, a missing checkpoint, ...) already say what is wrong and what to do:
they are printed as one line, `error: ...`, with exit status 2 for a config error and 1 for the
others, never as a traceback. Ctrl-C outside training exits with 130 (128 + SIGINT).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, Mapping, Sequence

import jax

from s2s_jax import checkpoint, hardware
from s2s_jax.config import ConfigError

# Errors whose message says what is wrong; ConfigError and DataError are ValueErrors.
KNOWN_ERRORS = (ValueError, OSError, checkpoint.CheckpointError, FloatingPointError)
CACHE_ENV = "S2S_JAX_COMPILATION_CACHE"  # a folder for compiled programs, or "off"


def _without_traceback(record: logging.LogRecord) -> bool:
  record.exc_info, record.exc_text = None, None
  return True


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr, force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # orbax logs the errors of its background threads with their tracebacks; the error that
  # reaches the program says what happened (one line), so theirs are left out.
  absl = logging.getLogger("absl")
  if _without_traceback not in absl.filters:
    absl.addFilter(_without_traceback)


def compilation_cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
  """The folder where the command lines keep compiled programs; None when
  $S2S_JAX_COMPILATION_CACHE is "off". Default: $XDG_CACHE_HOME/s2s_jax/xla, or
  ~/.cache/s2s_jax/xla."""
  folder = environ.get(CACHE_ENV, "")
  if folder == "off":
    return None
  if folder:
    return folder
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "s2s_jax", "xla")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache in `compilation_cache_dir()`, unless one is
  already configured (JAX_COMPILATION_CACHE_DIR) or the folder cannot be made. Returns the
  folder in use, or None.

  A rerun (a resume, another training of the same shapes, decoding a trained model) then loads
  what XLA compiled before instead of compiling it again. On a 2-core CPU, 26 quickstart steps
  over its 8 padded lengths took 13 s instead of 35 s, and the whole short command 83 s instead
  of 115 s. A paper-size program takes tens of seconds to compile. JAX stores programs that took
  at least a second to compile. Call before the first compile.
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = compilation_cache_dir()
  if folder is None:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    logging.warning("no compilation cache: cannot create %s (%s)", folder, e)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def setup() -> None:
  """Process setup shared by the command lines: host memory reuse (when JAX will run on its
  CPU backend, `hardware.cpu_backend_expected`), logging, then the compilation cache."""
  if hardware.cpu_backend_expected()[0]:
    hardware.reuse_host_memory()
  setup_logging()
  enable_compilation_cache()


def one_line(e: BaseException) -> str:
  """An exception's message on one line (its type name when it has none)."""
  return " ".join(str(e).split()) or type(e).__name__


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
  """`main(argv)` after `setup()`, with the error policy of the module doc; its exit status.
  The logging handlers are put back as they were when it returns (a command run in-process, by
  a test or a notebook, leaves no handler on a stream that may close)."""
  handlers, level = logging.root.handlers[:], logging.root.level
  setup()
  try:
    return main(argv)
  except KNOWN_ERRORS as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2 if isinstance(e, ConfigError) else 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 128 + signal.SIGINT
  finally:
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
