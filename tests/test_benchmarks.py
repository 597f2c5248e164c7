"""The benchmark harness's round-by-round ratio and device choices (no PyTorch needed:
synthetic timings)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.compare import (Variant, _torch_runs, describe_spread, paired_ratios, torch_device,
                                xla_extra_bytes)


def variant(name, framework, times, units=100.0, task="train"):
  return Variant(name=name, task=task, framework=framework, dtype="bfloat16", run=lambda: None,
                 flops=0, units=units, times=list(times))


def test_paired_ratios_pair_the_fastest_variants_round_by_round():
  rows = [
      variant("ours f32", "ours", [4.0, 4.0, 4.0]),
      variant("ours bf16", "ours", [1.0, 2.0, 1.0]),  # fastest of ours by median
      variant("torch bf16 2t", "torch", [1.1, 1.8, 1.2]),  # fastest of torch by median
      variant("torch bf16 1t", "torch", [3.0, 3.0, 3.0]),
      variant("ours greedy", "ours", [9.0, 9.0, 9.0], task="greedy"),  # another task: ignored
  ]
  assert paired_ratios(rows, "train") == pytest.approx([1.1, 0.9, 1.2])
  assert paired_ratios(rows, "greedy") == []  # no PyTorch row for that task


def test_paired_ratios_use_work_per_run():
  # our run does twice the work (units) in 1.5x the time: 1.33x PyTorch's speed
  rows = [variant("ours", "ours", [3.0], units=200.0), variant("torch", "torch", [2.0])]
  assert paired_ratios(rows, "train") == pytest.approx([4 / 3])


def test_describe_spread():
  assert describe_spread([0.9, 1.1, 0.95, 1.2, 0.8]) == (
      "median 0.95, quartiles 0.85-1.15, 3/5 rounds below 1")
  assert describe_spread([1.05]) == "median 1.05, quartiles 1.05-1.05, 0/1 rounds below 1"


def test_torch_runs_leaves_out_what_pytorch_cannot_run_here():
  info, logged = {}, []
  assert _torch_runs("torch f32 train", lambda: 1.5, info, logged.append) == (True, 1.5)
  assert info == {} and logged == []

  def no_bf16_lstm():
    raise RuntimeError("could not create a primitive descriptor for the LSTM forward "
                       "propagation primitive.\nRun workload with ONEDNN_VERBOSE=all")

  assert _torch_runs("torch bf16 train", no_bf16_lstm, info, logged.append) == (False, None)
  assert info == {"not_run": {"torch bf16 train": "could not create a primitive descriptor for "
                                                  "the LSTM forward propagation primitive."}}
  assert len(logged) == 1 and "torch bf16 train" in logged[0]
  with pytest.raises(ValueError):  # anything but PyTorch's RuntimeError still fails the run
    _torch_runs("torch f32 greedy", lambda: int("x"), info, logged.append)


def test_torch_runs_where_jax_computes():
  assert torch_device("cpu", cuda_available=False) == "cpu"
  assert torch_device("cpu", cuda_available=True) == "cpu"  # JAX on the CPU: torch there too
  assert torch_device("gpu", cuda_available=True) == "cuda"
  with pytest.raises(SystemExit, match="no CUDA.*--skip-torch"):
    torch_device("gpu", cuda_available=False)
  with pytest.raises(SystemExit, match="'tpu'.*--skip-torch"):
    torch_device("tpu", cuda_available=True)


def test_xla_extra_bytes_leaves_out_arguments_and_donated_outputs():
  x = jnp.ones((256, 256), jnp.float32)  # 256 KiB
  f = lambda a: a * 2.0 + 1.0  # one fused loop: no temporaries
  fresh = jax.jit(f).lower(x).compile().memory_analysis()
  donated = jax.jit(f, donate_argnums=0).lower(x).compile().memory_analysis()
  assert xla_extra_bytes(fresh) == 256 * 256 * 4  # a new output buffer
  assert xla_extra_bytes(donated) == 0  # written over the donated argument


def test_moses_benchmark_checks_both_tokenizers_agree(monkeypatch, capsys):
  from benchmarks import moses as bench
  monkeypatch.setattr("sys.argv", ["moses", "--sentences", "200"])
  bench.main()
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
  assert [r[0] for r in rows] == ["en", "fr"] and all(r[-1] == "True" for r in rows)
