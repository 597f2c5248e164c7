"""Figure 3: BLEU of test sentences grouped by length and by average word-frequency rank.

    python -m s2s_jax.analysis.by_length --workdir DIR [--ensemble DIR2 ...] [--beam_size B]
        [--split test | --src FILE --ref FILE] [--num_bins 8] [--length_edges 4,7,8,12]
        [--ranks vocab|train] [--out DIR]

Every sentence is translated once (1-best, the WORKDIR's decode settings unless overridden);
then corpus BLEU (sacreBLEU and the paper's tokenized BLEU, `s2s_jax.bleu`) is computed
inside each group:
- length: the source sentence's length in words (the model's tokenizer). The groups are the
  paper's: sentences sorted by length and cut into --num_bins groups of about equal size,
  snapped to whole lengths, so group k holds lengths in (edge_{k-1}, edge_k]; or give the
  edges with --length_edges.
- rarity: the average frequency rank of the source sentence's words, rank 1 = the most
  frequent training word. --ranks vocab (default) reads the ranks from the WORKDIR's source
  vocabulary (built by frequency on the training split; a word outside it ranks just after
  its last word); --ranks train recounts every training word (exact, slower on big corpora;
  an unseen word ranks after every training word). Sentences are sorted by this average and
  cut into --num_bins groups of about equal size.
Writes by_length.png, by_rarity.png and by_length.json (both groupings, counts, BLEU).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from s2s_jax import bleu, cli, translate
from s2s_jax.analysis import common
from s2s_jax.data import pipeline
from s2s_jax.data.vocab import SPECIALS, Vocab


def word_ranks(sentences: Iterable[Sequence[str]]) -> dict[str, int]:
  """Frequency rank of every word (1 = most frequent; ties broken by the word's string)."""
  counts = collections.Counter(w for sent in sentences for w in sent)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return {w: r for r, (w, _) in enumerate(ranked, 1)}


def vocab_ranks(vocab: Vocab) -> dict[str, int]:
  """Ranks from a frequency-ordered vocabulary (its first real word is rank 1)."""
  return {w: r for r, w in enumerate(vocab.tokens[len(SPECIALS):], 1)}


def average_rank(tokens: Sequence[str], ranks: dict[str, int]) -> float:
  """Mean rank of the tokens; a word without a rank counts as len(ranks) + 1."""
  if not tokens:
    return 0.0
  unseen = len(ranks) + 1
  return float(np.mean([ranks.get(t, unseen) for t in tokens]))


def quantile_edges(values: Sequence[float], num_bins: int) -> list[float]:
  """Upper edges that cut the sorted values into `num_bins` groups of about equal size.

  Edge k is the value at position max(1, floor(k * n / num_bins)) of the sorted list
  (1-based), so equal values always share a group; repeated edges collapse (fewer groups).
  """
  if num_bins < 1:
    raise ValueError(f"--num_bins must be at least 1, got {num_bins}")
  v = sorted(values)
  if not v:
    return []
  edges = []
  for k in range(1, num_bins + 1):
    e = v[max(1, k * len(v) // num_bins) - 1]
    if not edges or e > edges[-1]:
      edges.append(e)
  return edges


def assign_bins(values: Sequence[float], edges: Sequence[float]) -> list[list[int]]:
  """Indices of the values in (edges[k-1], edges[k]] for each k (the first bin has no lower edge).

  Values above the last edge get a bin of their own at the end; empty bins are kept (empty).
  """
  if list(edges) != sorted(set(edges)):
    raise ValueError(f"bin edges must be strictly increasing, got {list(edges)}")
  bins: list[list[int]] = [[] for _ in range(len(edges) + 1)]
  for i, x in enumerate(values):
    bins[int(np.searchsorted(edges, x, side="left"))].append(i)
  if not bins[-1]:
    bins.pop()
  return bins


def bin_labels(edges: Sequence[float], count: int, fmt: str = "{:g}") -> list[str]:
  """'<=e0', '(e0, e1]', ..., '>e_last' style labels for `count` bins; whole numbers as ranges."""
  out = []
  for k in range(count):
    lo = edges[k - 1] if k > 0 else None
    hi = edges[k] if k < len(edges) else None
    integral = all(float(e).is_integer() for e in edges)
    if hi is None:
      out.append(f">{fmt.format(lo)}")
    elif lo is None:
      out.append(f"<={fmt.format(hi)}")
    elif integral:
      a, b = int(lo) + 1, int(hi)
      out.append(f"{a}" if a == b else f"{a}-{b}")
    else:
      out.append(f"({fmt.format(lo)}, {fmt.format(hi)}]")
  return out


ScoreFn = Callable[[Sequence[Sequence[str]], Sequence[str]], dict[str, Any]]  # -> {bleu, bleu_tok}


def bleu_by_bin(bins: Sequence[Sequence[int]], values: Sequence[float], labels: Sequence[str],
                hyp_tokens: Sequence[Sequence[str]], refs: Sequence[str],
                score: ScoreFn) -> list[dict[str, Any]]:
  """Corpus BLEU (both ways, `score`) inside each bin, with its size and the mean of `values`."""
  out = []
  for label, idx in zip(labels, bins):
    rec: dict[str, Any] = {"label": label, "count": len(idx)}
    if idx:
      scores = score([hyp_tokens[i] for i in idx], [refs[i] for i in idx])
      rec.update(bleu=scores["bleu"], bleu_tok=scores["bleu_tok"],
                 mean=float(np.mean([values[i] for i in idx])),
                 min=float(min(values[i] for i in idx)), max=float(max(values[i] for i in idx)))
    out.append(rec)
  return out


def plot_bins(groups: Sequence[dict[str, Any]], path: str, xlabel: str, title: str) -> None:
  """BLEU per group, both ways, with the group sizes under the labels."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  used = [g for g in groups if g["count"]]
  x = np.arange(len(used))
  ax.plot(x, [g["bleu"] for g in used], "o-", label="sacreBLEU (detokenized)")
  ax.plot(x, [g["bleu_tok"] for g in used], "s--", label="tokenized BLEU (paper)")
  ax.set_xticks(x)
  ax.set_xticklabels([f"{g['label']}\n(n={g['count']})" for g in used], fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("BLEU")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def scorer(m: translate.Loaded) -> ScoreFn:
  """Both BLEU figures (`bleu.score_translations`) for the model's target side."""
  return lambda hyps, refs: bleu.score_translations(hyps, refs, m.cfg.data.tokenizer,
                                                    m.cfg.data.tgt_lang, workdir=m.workdir)


def analyse(src_tokens: Sequence[Sequence[str]], hyp_tokens: Sequence[Sequence[str]],
            refs: Sequence[str], ranks: dict[str, int], score: ScoreFn, num_bins: int = 8,
            length_edges: Sequence[int] | None = None) -> dict[str, Any]:
  """Both groupings for already translated sentences."""
  lengths = [len(t) for t in src_tokens]
  edges = list(length_edges) if length_edges else quantile_edges(lengths, num_bins)
  bins = assign_bins(lengths, edges)
  by_len = bleu_by_bin(bins, lengths, bin_labels(edges, len(bins)), hyp_tokens, refs, score)
  avg = [average_rank(t, ranks) for t in src_tokens]
  r_edges = quantile_edges(avg, num_bins)
  r_bins = assign_bins(avg, r_edges)
  by_rank = bleu_by_bin(r_bins, avg, bin_labels(r_edges, len(r_bins), "{:.0f}"), hyp_tokens, refs,
                        score)
  overall = score(hyp_tokens, refs)
  return {"length": {"edges": [float(e) for e in edges], "bins": by_len},
          "rarity": {"edges": [float(e) for e in r_edges], "bins": by_rank},
          "overall": overall, "num_sentences": len(refs)}


def summary(result: dict[str, Any]) -> str:
  lines = [f"{result['num_sentences']} sentences: BLEU {result['overall']['bleu']:.2f}, "
           f"tokenized BLEU {result['overall']['bleu_tok']:.2f}"]
  for name, unit in (("length", "words"), ("rarity", "average rank")):
    lines.append(f"by {name} ({unit}):")
    for g in result[name]["bins"]:
      if g["count"]:
        lines.append(f"  {g['label']:>16}  n={g['count']:<5d} BLEU {g['bleu']:6.2f}  "
                     f"tok {g['bleu_tok']:6.2f}")
  return "\n".join(lines)


def _ranks(mode: str, m: translate.Loaded) -> dict[str, int]:
  if mode == "vocab":
    return vocab_ranks(m.src_vocab)
  corpus = pipeline.load_corpus(m.cfg.data, m.workdir)  # the prepared store: counts, no text
  return corpus.prepared.word_ranks(0)


def _parse_edges(text: str | None) -> list[int] | None:
  if not text:
    return None
  try:
    return [int(x) for x in text.split(",")]
  except ValueError:
    raise ValueError("--length_edges must be comma-separated whole numbers, "
                     f"got {text!r}") from None


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.analysis.by_length",
                                   description=__doc__.split("\n")[0])
  translate.add_model_flags(parser, ("beam_size", "batch_size", "max_len_a", "max_len_b",
                                     "length_penalty"))
  common.add_eval_flags(parser)
  parser.add_argument("--num_bins", type=int, default=8, help="groups per figure")
  parser.add_argument("--length_edges", help="upper edges of the length groups, e.g. 4,7,8,12,17")
  parser.add_argument("--ranks", default="vocab", choices=("vocab", "train"),
                      help="where word-frequency ranks come from")
  args = parser.parse_args(argv)
  edges = _parse_edges(args.length_edges)
  m = translate.load_from_flags(args)
  srcs, refs, name = common.eval_sentences(m.cfg, args.split, args.src, args.ref,
                                           args.max_sentences)
  tok = translate.tokenizer(m, "src")
  src_tokens = [tok(s) for s in srcs]
  hyp_tokens = common.translate_tokens(m, srcs, name)
  result = analyse(src_tokens, hyp_tokens, refs, _ranks(args.ranks, m), scorer(m), args.num_bins,
                   edges)
  result.update(workdirs=[args.workdir] + list(args.ensemble), steps=m.steps, data=name,
                beam_size=m.cfg.decode.beam_size, ranks=args.ranks)
  folder = common.out_dir(args)
  who = f"{len(m.steps)} model(s), beam {m.cfg.decode.beam_size}, {name}"
  plot_bins(result["length"]["bins"], os.path.join(folder, "by_length.png"),
            "source sentence length (words)", f"BLEU by sentence length ({who})")
  plot_bins(result["rarity"]["bins"], os.path.join(folder, "by_rarity.png"),
            "average frequency rank of the source words (1 = most frequent)",
            f"BLEU by word rarity ({who})")
  common.write_json(os.path.join(folder, "by_length.json"), result)
  print(summary(result))
  logging.info("wrote by_length.png, by_rarity.png and by_length.json in %s", folder)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
