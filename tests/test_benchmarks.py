"""The benchmark harness: round-by-round ratios and device choices (synthetic timings), the
PyTorch reference's searches against ours (skipped without torch)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.compare import (
  Variant,
  _torch_runs,
  describe_spread,
  paired_ratios,
  torch_device,
  xla_extra_bytes,
)
from s2s_jax import decode, model
from s2s_jax.config import ModelConfig
from s2s_jax.data.vocab import EOS_ID, PAD_ID


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


# ---------------------------------------------------------------------------------------------
# The PyTorch reference's searches against ours, from the same weights (skipped without torch).
# A tiny peaked model whose outputs end at their caps, before them, and early enough that the
# whole batch stops before its longest cap.

TINY = ModelConfig(num_layers=2, hidden_size=16, embed_size=8, init_scale=1.0)
SRC_V, TGT_V = 30, 25
SRC_LENS = (9, 1, 4, 0, 7, 2)  # row 3 is empty: its cap is 1 (only </s>)
LEN_A, LEN_B, MAX_LEN = 1.0, 2, 12
CAPS = decode.output_caps(SRC_LENS, LEN_A, LEN_B, MAX_LEN)


@pytest.fixture(scope="module")
def tiny():
  """(params, torch net, sources BxS) of one tiny model."""
  pytest.importorskip("torch", reason="the PyTorch reference needs torch "
                      "(pip install -r benchmarks/requirements.txt)")
  from benchmarks import torch_ref
  like = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), TINY, SRC_V, TGT_V))
  rng = np.random.default_rng(2)
  s = TINY.init_scale
  params = jax.tree_util.tree_map(lambda x: rng.uniform(-s, s, x.shape).astype(np.float32), like)
  params["softmax"]["w"] *= 3.0  # peaked distributions
  params["softmax"]["b"][EOS_ID] += 0.5
  src = np.zeros((len(SRC_LENS), max(SRC_LENS)), np.int32)
  for i, n in enumerate(SRC_LENS):
    src[i, :n] = rng.integers(4, SRC_V, n)
  net = torch_ref.Seq2Seq(TINY.num_layers, TINY.hidden_size, TINY.embed_size, SRC_V, TGT_V)
  net.load_params(params)
  return params, net, src


def ours_beam(params, src, beam_size, nbest, alpha):
  return jax.device_get(decode.beam(params, src, CAPS, cfg=TINY, beam_size=beam_size,
                                    nbest=nbest, max_len=MAX_LEN, length_penalty=alpha))


def test_the_tiny_model_ends_before_at_and_long_before_its_caps(tiny):
  """Guards the next test: it covers ended, capped and stopped searches."""
  params, _, src = tiny
  hyp = ours_beam(params, src, 5, 3, 0.0)
  caps = np.array([min(MAX_LEN, int(LEN_A * n) + LEN_B) if n else 1 for n in SRC_LENS])
  lengths = np.sum(hyp.tokens_BxNxT != PAD_ID, axis=2)
  finite = np.isfinite(hyp.scores_BxN)
  assert np.any(finite & (lengths == caps[:, None])) and np.any(finite & (lengths < caps[:, None]))
  assert np.any(lengths[:, 0] > 1) and not np.all(finite)  # the empty row has one hypothesis
  assert int(hyp.steps) < caps.max()  # every sentence stopped early


@pytest.mark.parametrize("beam_size,nbest,alpha", [
    (1, 1, 0.0), (1, 1, 1.0), (2, 1, 1.0), (2, 2, 0.0), (5, 1, 0.0), (5, 3, 1.0)])
def test_torch_beam_search_equals_ours(tiny, beam_size, nbest, alpha):
  import torch

  from benchmarks import torch_ref
  params, net, src = tiny
  ours = ours_beam(params, src, beam_size, nbest, alpha)
  theirs = torch_ref.beam(net, torch.from_numpy(src).long(), beam_size=beam_size, nbest=nbest,
                          cap_B=torch.from_numpy(CAPS), max_len=MAX_LEN,
                          length_penalty=alpha)
  np.testing.assert_array_equal(theirs.tokens_BxNxT.numpy(), ours.tokens_BxNxT)
  np.testing.assert_allclose(theirs.scores_BxN.numpy(), ours.scores_BxN, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(theirs.log_probs_BxN.numpy(), ours.log_probs_BxN, rtol=1e-5,
                             atol=1e-5)
  assert theirs.steps == int(ours.steps)


def test_torch_greedy_equals_ours(tiny):
  """Full-length sources, the cap max_len for all (how benchmarks.compare runs both)."""
  import torch

  from benchmarks import torch_ref
  params, net, src = tiny
  full = src[np.array(SRC_LENS) == max(SRC_LENS)].repeat(2, axis=0)
  full[1, :3] = full[1, :3][::-1]
  tok, lp = jax.device_get(decode.greedy(params, full, cfg=TINY, max_len=MAX_LEN))
  tok_t, lp_t = torch_ref.greedy(net, torch.from_numpy(full).long(), MAX_LEN)
  np.testing.assert_array_equal(tok_t.numpy(), tok)
  np.testing.assert_allclose(lp_t.numpy(), lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,feed", [("general", True), ("concat", False)])
def test_torch_attention_model_computes_our_loss_and_gradients(tiny, attention, feed):
  """torch_ref.AttentionSeq2Seq is the model benchmarks.compare --attention times."""
  import torch

  from benchmarks import torch_ref
  _, _, src = tiny
  cfg = dataclasses.replace(TINY, attention=attention, input_feeding=feed, init_scale=0.5,
                            attention_positions=12, kernels="plain")
  params = jax.device_get(model.init_params(jax.random.PRNGKey(3), cfg, SRC_V, TGT_V))
  full = src[np.array(SRC_LENS) == max(SRC_LENS)].repeat(3, axis=0)  # no padding
  tgt = np.random.default_rng(3).integers(4, TGT_V, (3, 6)).astype(np.int32)
  batch = {"src": full, "tgt": tgt}
  loss, grads = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, cfg)[0]))(params)
  net = torch_ref.AttentionSeq2Seq(cfg.num_layers, cfg.hidden_size, cfg.embed_size, SRC_V, TGT_V,
                                   attention, feed, cfg.attention_positions)
  net.load_params(params)
  loss_t = net.loss(torch.from_numpy(full).long(), torch.from_numpy(tgt).long())
  loss_t.backward()
  assert float(loss_t.detach()) == pytest.approx(float(loss), rel=1e-6)
  np.testing.assert_allclose(net.att["w_c"].grad.numpy(), grads["attention"]["w_c"], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(net.decoder.weight_ih_l0.grad.numpy().T, grads["decoder"][0]["w_x"],
                             rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Smoke tests: the benchmark commands run end to end on the tiny config.

def test_parts_runs_on_the_tiny_config(capsys):
  from benchmarks import parts
  assert parts.main(["--config", "tiny", "--dtype", "float32", "--reps", "1"]) == 0
  rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[3:]]
  assert [r[1].strip() for r in rows][:2] == ["train step (donated state)", "loss forward"]
  assert len(rows) == 7 and all(float(r[2]) >= 0 for r in rows)


def test_gpu_train_rehearsal_reports_the_real_commands_words_per_s(tmp_path):
  """gpu.sh's train step on the CPU, tiny: the real wmt14 command, its words/s read back."""
  from benchmarks import gpu
  out, work = str(tmp_path / "out"), str(tmp_path / "work")
  assert gpu.main(["train", "--tiny", "--allow-cpu", "--steps", "10", "--log-every", "5",
                   "--pairs", "200", "--out", out, "--work", work]) == 0
  with open(os.path.join(out, "train_float32.json")) as f:
    result = json.load(f)
  assert result["status"] == 0 and result["command"][1:3] == ["-m", "experiments.wmt14"]
  assert result["intervals"] == 1 and result["words_per_s"] > 0
  assert result["vocab"] == [2004, 1004]  # both vocabularies full, as in the paper's run


def test_compare_runs_on_the_tiny_config(capsys):
  """With torch, both frameworks' searches give the same outputs in the same number of steps."""
  import importlib.util

  from benchmarks import compare
  with_torch = importlib.util.find_spec("torch") is not None
  argv = ["--config", "tiny", "--dtype", "float32", "--beams", "2", "--malloc", "system",
          "--cache-dir", "off"] + (["--torch-threads", "1"] if with_torch else ["--skip-torch"])
  assert compare.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line.split("|")[1].strip() for line in out if line.startswith("| ")][1:] == (
      ["train", "greedy", "beam2"] if not with_torch else
      ["train", "train", "greedy", "greedy", "beam2", "beam2"])
  if with_torch:
    assert "same search: f32 greedy outputs identical for 4/4 sentences, steps ours 50, " \
        "torch 50" in out
    assert any(line.startswith("same search: f32 beam2 outputs identical for 4/4") for line in out)
    assert out[-1].startswith("ratio train=") and " beam2=" in out[-1]
