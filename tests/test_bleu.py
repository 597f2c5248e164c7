"""Both BLEU figures equal sacrebleu's own command line on the same files."""

import json
import subprocess
import sys

import pytest

from s2s_jax import bleu
from s2s_jax.data import tokenize

REFS = ["The cat sat on the mat, didn't it?", "Le chien voit la vieille femme.",
        "It's 5 o'clock; \"quoted\" words here.", "An exact match.", "Short."]
HYPS = ["The cat sat on a mat, did it?", "Le chien voit la femme.",
        "It's five o'clock; \"quoted\" words.", "An exact match.", "Something else entirely."]


def sacrebleu_cli(tmp_path, hyps, refs, *flags) -> float:
  ref_file, hyp_file = tmp_path / "ref.txt", tmp_path / "hyp.txt"
  ref_file.write_text("".join(r + "\n" for r in refs), encoding="utf-8")
  hyp_file.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
  out = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file),
                        "--format", "json", "--width", "6", *flags],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout)["score"]


@pytest.mark.parametrize("kind", ["moses", "none"])
def test_both_figures_match_the_sacrebleu_command_line(tmp_path, kind):
  hyp_tokens = [bleu.bleu_tokens(kind, "en")(h) for h in HYPS]  # what a model would emit
  scores = bleu.score_translations(hyp_tokens, REFS, kind, "en")

  detok_hyps = [tokenize.detokenizer(kind, "en")(t) for t in hyp_tokens]
  tok_hyps = [" ".join(t) for t in hyp_tokens]
  tok_refs = [" ".join(bleu.bleu_tokens(kind, "en")(r)) for r in REFS]
  if kind == "moses":  # the tokenized text really differs from the raw text
    assert tok_refs[0] != REFS[0] and tok_hyps[0] != detok_hyps[0]
  standard = sacrebleu_cli(tmp_path, detok_hyps, REFS)
  paper = sacrebleu_cli(tmp_path, tok_hyps, tok_refs, "--tokenize", "none", "--force")
  assert scores["bleu"] == pytest.approx(standard, abs=1e-5)
  assert scores["bleu_tok"] == pytest.approx(paper, abs=1e-5)
  assert 5 < scores["bleu"] < 95 and 5 < scores["bleu_tok"] < 95
  assert scores["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
  assert "tok:none" in scores["signature_tok"]


def test_perfect_and_disjoint():
  same = bleu.compute(REFS, REFS, REFS, REFS)
  assert same["bleu"] == pytest.approx(100.0) and same["bleu_tok"] == pytest.approx(100.0)
  other = ["zzz qqq"] * len(REFS)
  assert bleu.compute(other, REFS, other, REFS)["bleu"] == 0.0


def test_tokenized_figure_ignores_13a_rules():
  """tokenize='none': "mat," is one token for the paper's figure, two for sacreBLEU's 13a."""
  hyp, ref = ["the cat sat on the mat ,"], ["the cat sat on the mat,"]
  s = bleu.compute(hyp, ref, hyp, ref)
  assert s["bleu"] == pytest.approx(100.0) and s["bleu_tok"] < 100.0


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="one reference per hypothesis"):
    bleu.compute(["a"], ["a", "b"], ["a"], ["a"])
