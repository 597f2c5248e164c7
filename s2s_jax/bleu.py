"""BLEU, two ways from one call (both with sacrebleu).

- `bleu`: standard sacreBLEU on detokenized hypotheses and raw references (its own 13a
  tokenization, cased), reported with its signature. Comparable across papers and tools.
- `bleu_tok`: the paper's figure, "cased BLEU on tokenized predictions and references as
  multi-bleu.pl computes it": sacreBLEU with tokenize='none' (text split on spaces only) and
  force=True over Moses-tokenized hypotheses and references.

What "tokenized" means (`bleu_tokens`): for a word-level corpus tokenizer (data.tokenizer
moses or none) it is that tokenizer, i.e. the model's own output tokens and the reference
tokenized exactly like the training targets, which is how the paper's pre-tokenized WMT data
was scored. For any other tokenizer (e.g. subwords) both sides are Moses-tokenized text.
"""

from __future__ import annotations

from typing import Callable, Sequence

from s2s_jax.data import tokenize

WORD_TOKENIZERS = ("moses", "none")


def compute(hyps: Sequence[str], refs: Sequence[str], hyps_tok: Sequence[str],
            refs_tok: Sequence[str]) -> dict[str, object]:
  """{'bleu', 'signature', 'bleu_tok', 'signature_tok'} for one reference per hypothesis.

  `hyps`/`refs` are detokenized text; `hyps_tok`/`refs_tok` the same sentences tokenized,
  tokens separated by single spaces.
  """
  from sacrebleu.metrics import BLEU

  if not len(hyps) == len(refs) == len(hyps_tok) == len(refs_tok):
    raise ValueError(f"BLEU needs one reference per hypothesis, got {len(hyps)} hypotheses, "
                     f"{len(refs)} references ({len(hyps_tok)}, {len(refs_tok)} tokenized)")
  standard = BLEU()
  paper = BLEU(tokenize="none", force=True)
  return {"bleu": standard.corpus_score(list(hyps), [list(refs)]).score,
          "signature": str(standard.get_signature()),
          "bleu_tok": paper.corpus_score(list(hyps_tok), [list(refs_tok)]).score,
          "signature_tok": str(paper.get_signature())}


def bleu_tokens(kind: str, lang: str) -> Callable[[str], list[str]]:
  """The tokenization used for the paper's (multi-bleu) figure; see the module docstring."""
  return tokenize.tokenizer(kind if kind in WORD_TOKENIZERS else "moses", lang)


def score_translations(hyp_tokens: Sequence[Sequence[str]], refs: Sequence[str], kind: str,
                       lang: str, workdir: str | None = None) -> dict[str, object]:
  """Both BLEU figures for model outputs (target tokens) against raw reference sentences.

  `kind`, `lang`: the target side's data.tokenizer and language (`workdir`: the WORKDIR
  holding a sentencepiece model).
  """
  detok = tokenize.detokenizer(kind, lang, workdir=workdir)
  hyps = [detok(list(t)) for t in hyp_tokens]
  tok = bleu_tokens(kind, lang)
  if kind in WORD_TOKENIZERS:
    hyps_tok = [" ".join(t) for t in hyp_tokens]
  else:
    hyps_tok = [" ".join(tok(h)) for h in hyps]
  refs_tok = [" ".join(tok(r)) for r in refs]
  return compute(hyps, refs, hyps_tok, refs_tok)
