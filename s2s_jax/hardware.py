"""What the machine offers: native bfloat16 matmuls (model.compute_dtype=auto) and the host
memory settings for XLA's CPU backend."""

from __future__ import annotations

import os
import sys

import jax

# x86 instructions that XLA's CPU dots use for bfloat16 operands (AVX512-BF16 dot products, AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_dtype(backend: str | None = None,
                      cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
  """The matmul dtype `model.compute_dtype=auto` picks on this machine, and why (for the log).

  bfloat16 on accelerators and on x86 CPUs with bf16 dot-product instructions (on a Zen 4 with
  AVX512-BF16 the quickstart trains ~1.7x faster than in float32); float32 on every other CPU,
  where XLA widens bf16 operands in software (a quickstart step 1.45x slower than float32 on a
  Zen 1, see BENCHMARKS.md). CPUs other than x86 Linux were not measured: float32.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "bfloat16", f"{backend} backend"
  try:
    with open(cpuinfo) as f:
      flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
  except OSError:
    return "float32", f"CPU, {cpuinfo} unreadable"
  found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
  if found:
    return "bfloat16", f"CPU with {' and '.join(found)}"
  return "float32", (f"CPU without {' or '.join(BF16_CPU_FLAGS)}: bfloat16 would be widened in "
                     "software")


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_ENV = "S2S_JAX_MALLOC"  # =system: leave glibc's malloc settings alone


def reuse_host_memory() -> bool:
  """Makes glibc keep freed host memory for reuse. True if applied (Linux with glibc only).

  Every run of a jitted program on XLA's CPU backend allocates its temporaries as one block
  (128 MB for the small benchmark model's train step). glibc serves a block that large with a
  fresh mmap and unmaps it on free, so each step faults the whole block in again and the
  kernel zeroes it page by page: about a quarter of a small CPU train step. With one arena,
  no mmap for large blocks and no trimming, the block comes from the heap where the previous
  step left it. Call before JAX starts its backend: threads keep the arena they first used.
  """
  if os.environ.get(MALLOC_ENV, "") == "system" or sys.platform != "linux":
    return False
  try:
    import ctypes
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
              mallopt(_M_TRIM_THRESHOLD, -1)])  # -1: never trim (blocks can exceed 2 GiB)
