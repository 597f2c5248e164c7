"""Every command line of the project runs, as `python -m NAME ARGS` runs it, with its smallest
settings: the experiment presets for a few steps, each s2s_jax command on one tiny trained
WORKDIR, each benchmark on a tiny shape. A new entry point without a case here fails
`test_every_entry_point_has_a_case`."""

import os
import runpy
import sys

import pytest

from s2s_jax import config as c
from s2s_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("s2s_jax", "experiments", "benchmarks")
TINY_MODEL = ["--model.num_layers=1", "--model.hidden_size=8", "--model.embed_size=8"]
TINY_RUN = ["--train.num_steps=2", "--train.eval_every=0", "--train.log_every=1",
            "--train.batch_size=8", "--train.eval_batch_size=8", "--decode.beam_size=2"]
TINY_SYNTHETIC = ["--data.synthetic_train=300", "--data.synthetic_valid=16",
                  "--data.synthetic_test=16", "--data.src_vocab_size=200",
                  "--data.tgt_vocab_size=200"]


def entry_points() -> set[str]:
  """The modules with a `__main__` block, as `python -m` names them."""
  found = set()
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        path = os.path.join(folder, name)
        if name.endswith(".py") and 'if __name__ == "__main__":' in open(path).read():
          found.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
  return found


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, toy_corpus):
  """A tiny trained WORKDIR on the toy corpus, and a folder for outputs."""
  tmp = tmp_path_factory.mktemp("entry_points")
  workdir = str(tmp / "run")
  cfg = c.override(c.Config(), {
      "data.source": "text", "data.path": toy_corpus, "data.tokenizer": "none",
      "model.num_layers": 1, "model.hidden_size": 8, "model.embed_size": 8,
      "train.batch_size": 8, "train.eval_batch_size": 8, "train.num_steps": 4,
      "train.checkpoint_every": 2, "train.eval_every": 0, "decode.beam_size": 2})
  train.train(cfg, workdir, progress=False)
  src, ref = os.path.join(toy_corpus, "test.en"), os.path.join(toy_corpus, "test.fr")
  nbest = tmp / "test.nbest"
  with open(ref) as f:
    nbest.write_text("".join(f"{i} ||| {line.strip()} ||| f= 0 ||| -1.0\n"
                             for i, line in enumerate(f)))
  return {"workdir": workdir, "out": str(tmp / "out"), "src": src, "ref": ref,
          "nbest": str(nbest), "tmp": str(tmp), "corpus": toy_corpus}


def _case(*args):
  return lambda ctx: [a.format(**ctx) for a in args]


WORKDIR = ("--workdir", "{workdir}")
CASES = {  # module -> its arguments (ctx fields in braces)
    "experiments.quickstart": _case("--workdir", "{tmp}/quickstart", *TINY_MODEL, *TINY_RUN,
                                    *TINY_SYNTHETIC, "--data.max_len=12"),
    "experiments.wmt14": _case("--workdir", "{tmp}/wmt14", "--data.source=text",
                               "--data.path={corpus}", "--data.tokenizer=none", *TINY_MODEL,
                               *TINY_RUN),
    "experiments.ablations": _case("--workdir", "{tmp}/ablations", "--only", "base",
                                   "--max_sentences", "4", "--data.source=text",
                                   "--data.path={corpus}", "--data.tokenizer=none",
                                   *TINY_MODEL, *TINY_RUN),
    "experiments.ladder": _case("--workdir", "{tmp}/ladder", "--only", "base",
                                "--max_sentences", "4", "--data.source=text",
                                "--data.path={corpus}", "--data.tokenizer=none",
                                *TINY_MODEL, *TINY_RUN),
    "s2s_jax.translate": _case(*WORKDIR, "--input", "{src}", "--output", "{tmp}/hyp.txt"),
    "s2s_jax.evaluate": _case(*WORKDIR, "--split", "test", "--beam_size", "1"),
    "s2s_jax.rescore": _case(*WORKDIR, "--src", "{src}", "--nbest", "{nbest}", "--ref", "{ref}"),
    "s2s_jax.analysis.curves": _case(*WORKDIR, "--out", "{out}"),
    "s2s_jax.analysis.by_length": _case(*WORKDIR, "--beam_size", "1", "--out", "{out}"),
    "s2s_jax.analysis.long_examples": _case(*WORKDIR, "--beam_size", "1", "--out", "{out}"),
    "s2s_jax.analysis.pca": _case(*WORKDIR, "--out", "{out}"),
    "s2s_jax.analysis.attention": None,  # needs an attention model: tests/test_attention_cli.py
    "s2s_jax.average": _case(*WORKDIR, "--last", "2", "--out", "{tmp}/averaged"),
    "s2s_jax.data.schwenk": None,  # needs its archives: tests/test_schwenk.py runs its main
    "benchmarks.data": _case("--pairs", "600", "--from", "{corpus}"),
    "benchmarks.moses": _case("--sentences", "50"),
    "benchmarks.layers": _case("--layers", "1", "--softmax", "1", "--hidden", "8", "--vocab",
                               "20", "--batch", "8", "--length", "4", "--steps", "1",
                               "--warmup", "1"),
    "benchmarks.compare": None,  # tests/test_benchmarks.py runs it on the tiny config
    "benchmarks.host": _case("--batch", "8", "--steps", "50", "--rounds", "1", "--pairs", "100",
                             "--lengths", "3,5"),
    # the rehearsal of gpu.sh's LSTM step (its train step runs a subprocess: test_benchmarks)
    "benchmarks.gpu": _case("lstm", "--tiny", "--allow-cpu", "--reps", "1", "--out", "{tmp}/gpu"),
    "benchmarks.parts": None,  # tests/test_benchmarks.py runs it on the tiny config
}


def test_every_entry_point_has_a_case():
  assert entry_points() == set(CASES)


def run_module(name: str, argv: list[str]) -> int:
  """`python -m name argv` in this process; its exit status."""
  old = sys.argv
  sys.argv = [name] + argv
  try:
    runpy.run_module(name, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    return 0 if e.code is None else e.code
  finally:
    sys.argv = old
  return 0


# runpy warns when the module was imported before (by another test): harmless here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package")
@pytest.mark.parametrize("name", sorted(k for k, v in CASES.items() if v is not None))
def test_entry_point_runs(name, ctx, capsys):
  status = run_module(name, CASES[name](ctx))
  err = capsys.readouterr().err
  assert status == 0, err[-2000:]
  assert "Traceback" not in err
