"""What the machine offers: native bfloat16 matmuls (model.compute_dtype=auto) and the host
memory settings for XLA's CPU backend (applied only when that is the backend a run will use).

The rule for model.compute_dtype=auto: bfloat16 where the device multiplies bfloat16 natively
(TPUs; NVIDIA GPUs of compute capability 8.0 or more, A100 and later; x86 CPUs with AVX512-BF16
or AMX), float32 everywhere else (V100, T4, other GPUs, other CPUs), where bfloat16 would be
emulated or widened in software.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from typing import Any

import jax

# x86 instructions that XLA's CPU dots use for bfloat16 operands (AVX512-BF16 dot products, AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_CUDA_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA tensor cores with bfloat16


def native_bf16_dtype(device: Any = None, cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
  """The matmul dtype `model.compute_dtype=auto` picks on `device` (default: JAX's first
  device), and why (for the log); the rule is the module doc's.

  On CPUs: on a Zen 4 with AVX512-BF16 the quickstart trains ~1.7x faster in bfloat16; on a
  Zen 1, where XLA widens bf16 operands in software, a quickstart step is 1.45x slower than in
  float32 (BENCHMARKS.md). CPUs other than x86 Linux were not measured: float32.
  """
  device = device if device is not None else jax.devices()[0]
  platform = device.platform
  if platform == "tpu":
    return "bfloat16", "TPU"
  if platform in ("gpu", "cuda"):
    return _gpu_dtype(device)
  if platform != "cpu":
    return "float32", f"{platform} backend: bfloat16 support unknown"
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


def _gpu_dtype(device: Any) -> tuple[str, str]:
  """bfloat16 on NVIDIA GPUs of compute capability >= 8.0 (JAX's `device.compute_capability`,
  e.g. "8.0"), float32 on older ones and on GPUs that report none (ROCm)."""
  kind = getattr(device, "device_kind", "GPU")
  capability = str(getattr(device, "compute_capability", ""))
  try:
    version = tuple(int(x) for x in capability.split("."))
  except ValueError:
    version = ()
  if not version:
    return "float32", f"{kind}: not an NVIDIA GPU of compute capability >= 8.0"
  if version >= BF16_MIN_CUDA_CAPABILITY:
    return "bfloat16", f"{kind}, compute capability {capability}"
  return "float32", (f"{kind}, compute capability {capability} < 8.0: no bfloat16 tensor "
                     "cores")


def accelerator_plugins() -> list[str]:
  """The JAX accelerator plugins installed (CUDA, ROCm: modules under the `jax_plugins`
  namespace or `jax_plugins` entry points; `libtpu`), found without importing them."""
  found = set()
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  from importlib.metadata import entry_points
  found |= {e.name for e in entry_points(group="jax_plugins")}
  if importlib.util.find_spec("libtpu") is not None:
    found.add("libtpu")
  return sorted(found)


def cpu_backend_expected(platforms: str | None = None,
                         plugins: list[str] | None = None) -> tuple[bool, str]:
  """Whether JAX will run on its CPU backend, decided before it starts (and why).

  Yes when JAX_PLATFORMS (`jax.config.jax_platforms`) names cpu first, no when it names
  another platform first; when it is unset, yes exactly when no accelerator plugin is
  installed (`accelerator_plugins`): with one, JAX would start on the accelerator if it finds
  one, and the host settings are left alone.
  """
  platforms = jax.config.jax_platforms if platforms is None else platforms
  if platforms:
    first = platforms.split(",")[0].strip()
    return first == "cpu", f"JAX_PLATFORMS={platforms}"
  plugins = accelerator_plugins() if plugins is None else plugins
  if plugins:
    return False, f"accelerator plugins installed: {', '.join(plugins)}"
  return True, "no accelerator plugin installed"


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_ENV = "S2S_JAX_MALLOC"  # =system: leave glibc's malloc settings alone


def reuse_host_memory() -> bool:
  """Makes glibc keep freed host memory for reuse. True if applied (Linux with glibc only).
  For the CPU backend: callers check `cpu_backend_expected` first.

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
