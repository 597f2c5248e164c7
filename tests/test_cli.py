"""What every command shares: the one error policy, the compilation cache, the host memory
setting, and what the hardware offers (model.compute_dtype=auto)."""

import os
import platform
import subprocess
import sys
import types

import pytest

from s2s_jax import cli, hardware
from s2s_jax.config import ConfigError
from s2s_jax.data.sources import DataError


@pytest.mark.parametrize("error, status", [
    (ConfigError("model.hidden_size must be >= 1"), 2), (DataError("f.en: line 3: bad"), 1),
    (FileNotFoundError("WORKDIR/config.json: not found"), 1),
    (FloatingPointError("10 consecutive non-finite steps"), 1)])
def test_known_errors_are_one_line_with_a_status(capsys, error, status):
  def main(argv):
    raise error
  assert cli.run(main, []) == status
  assert capsys.readouterr().err == f"error: {error}\n"


def test_ctrl_c_outside_training_exits_130_without_a_traceback(capsys):
  def main(argv):
    raise KeyboardInterrupt
  assert cli.run(main, []) == 130
  assert capsys.readouterr().err == "interrupted\n"


def test_other_errors_are_not_hidden():
  def main(argv):
    raise RuntimeError("a bug")
  with pytest.raises(RuntimeError, match="a bug"):
    cli.run(main, [])


def _cpuinfo(tmp_path, flags):
  text = "".join(f"processor\t: {i}\nflags\t\t: fpu sse2 avx2 fma {flags}\n\n" for i in range(2))
  (tmp_path / "cpuinfo").write_text(text)
  return str(tmp_path / "cpuinfo")


def fake_device(platform, compute_capability=None, kind="test device"):
  """What native_bf16_dtype reads of a jax.Device (CPU devices have no compute_capability)."""
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  if compute_capability is not None:
    device.compute_capability = compute_capability
  return device


@pytest.mark.parametrize("device, flags, expected", [
    (fake_device("cpu"), "", "float32"),
    (fake_device("cpu"), "avx512f avx512_vnni avx512_bf16", "bfloat16"),
    (fake_device("cpu"), "amx_bf16 amx_tile", "bfloat16"),
    (fake_device("cpu"), "avx512f avx512_vnni", "float32"),
    (fake_device("gpu", "7.0", "Tesla V100-SXM2-16GB"), "", "float32"),
    (fake_device("gpu", "7.5", "Tesla T4"), "", "float32"),
    (fake_device("gpu", "8.0", "NVIDIA A100-SXM4-40GB"), "", "bfloat16"),
    (fake_device("gpu", "8.6", "NVIDIA GeForce RTX 3090"), "", "bfloat16"),
    (fake_device("gpu", "9.0", "NVIDIA H100 80GB HBM3"), "", "bfloat16"),
    (fake_device("gpu", "10.0", "NVIDIA B200"), "", "bfloat16"),
    (fake_device("gpu", None, "AMD Instinct MI250X"), "", "float32"),
    (fake_device("gpu", "gfx90a", "AMD Instinct MI250X"), "", "float32"),
    (fake_device("tpu", None, "TPU v4"), "", "bfloat16"),
    (fake_device("metal"), "", "float32")])
def test_auto_dtype_is_bfloat16_only_where_the_hardware_multiplies_bf16(tmp_path, device, flags,
                                                                         expected):
  dtype, why = hardware.native_bf16_dtype(device, _cpuinfo(tmp_path, flags))
  assert dtype == expected, why
  dtype, why = hardware.native_bf16_dtype(device, str(tmp_path / "missing"))
  assert dtype == ("float32" if device.platform == "cpu" else expected)
  assert device.platform != "cpu" or "missing" in why
  if device.platform == "gpu":
    assert device.device_kind in why


def test_host_memory_is_tuned_only_for_the_cpu_backend():
  expected = lambda platforms, plugins: hardware.cpu_backend_expected(platforms, plugins)[0]
  assert expected("cpu", ["xla_cuda12"]) and expected("cpu,cuda", [])
  assert not expected("cuda", []) and not expected("tpu,cpu", [])
  assert expected("", []) and not expected("", ["xla_cuda12"])
  assert not expected("", ["libtpu"])
  assert "xla_cuda12" in hardware.cpu_backend_expected("", ["xla_cuda12"])[1]
  # This machine: the test session runs JAX on the CPU (conftest sets JAX_PLATFORMS=cpu).
  assert hardware.cpu_backend_expected() == (True, "JAX_PLATFORMS=cpu")


# Faults taken by writing a fresh 512 MB malloc block after an equal block was freed, in a new
# process (the malloc settings are process-wide). Transparent huge pages are off for that
# process (PR_SET_THP_DISABLE), so that a fault is one 4 KiB page whatever the machine's setting.
_FAULTS_OF_SECOND_BLOCK = """
import ctypes, resource
from s2s_jax import hardware
print(hardware.reuse_host_memory())
libc = ctypes.CDLL("libc.so.6", use_errno=True)
assert libc.prctl(41, 1, 0, 0, 0) == 0, ctypes.get_errno()  # PR_SET_THP_DISABLE
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 512 << 20
def write_block():
  p = libc.malloc(n)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(p, 1, n)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(p)
  return faults
write_block()
print(write_block())
"""


def _second_block_faults(env_value):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hardware.MALLOC_ENV)}
  if env_value is not None:
    env[hardware.MALLOC_ENV] = env_value
  out = subprocess.run([sys.executable, "-c", _FAULTS_OF_SECOND_BLOCK], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_reuse_host_memory_keeps_freed_large_blocks_mapped():
  applied, faults = _second_block_faults(None)
  assert applied and faults < 50  # the freed block is reused as it is, already mapped
  applied, faults = _second_block_faults("system")
  assert not applied and faults > 100_000  # glibc's own: a fresh mmap, each of its 131072
  # pages faulted in again


def test_compilation_cache_dir_by_environment():
  home = os.path.expanduser("~")
  assert cli.compilation_cache_dir({}) == os.path.join(home, ".cache", "s2s_jax", "xla")
  assert cli.compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/s2s_jax/xla"
  assert cli.compilation_cache_dir({cli.CACHE_ENV: "/x", "XDG_CACHE_HOME": "/c"}) == "/x"
  assert cli.compilation_cache_dir({cli.CACHE_ENV: "off"}) is None
  # JAX's own variable (conftest sets one for the session) wins over the default folder
  assert cli.enable_compilation_cache() == os.environ["JAX_COMPILATION_CACHE_DIR"]


_CACHE_ONE_PROGRAM = """
import jax, jax.numpy as jnp
from s2s_jax import cli
print(cli.enable_compilation_cache())
jax.jit(lambda x: jnp.tanh(x @ x))(jnp.ones((64, 64))).block_until_ready()
"""


@pytest.mark.parametrize("setting", ["folder", "off", "unwritable"])
def test_command_lines_cache_compiled_programs(tmp_path, setting):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even this quick program
  folder = tmp_path / "cache"
  if setting == "unwritable":  # a plain file where the folder would go: no cache, no failure
    folder.write_text("")
    folder = folder / "xla"
  env[cli.CACHE_ENV] = "off" if setting == "off" else str(folder)
  out = subprocess.run([sys.executable, "-c", _CACHE_ONE_PROGRAM], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  if setting == "folder":
    assert out == [str(folder)] and len(os.listdir(folder)) >= 1  # the program's entry
  else:
    assert out == ["None"]
    assert not os.path.isdir(tmp_path / "cache")
