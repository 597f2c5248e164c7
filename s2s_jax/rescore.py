"""Rescore n-best lists (Moses format) with a model or an ensemble, as in the paper's Table 2.

    python -m s2s_jax.rescore --workdir DIR --src FILE --nbest FILE [--ref FILE] [--weight 0.5]

Each n-best line is `id ||| hypothesis ||| features ||| score` (id = 0-based source line; more
fields after the score are kept). The new score is
    (1 - weight) * score + weight * log p_LSTM(hypothesis | source),
with weight 0.5 the paper's even average. Hypotheses are read with the model's target
tokenizer (for pre-tokenized lists and data.tokenizer=none: split on spaces); words outside
the vocabulary count as <unk>. Writes the rescored list (features gain `lstm= L`, the score
field holds the new score, each id's entries best first) and the new 1-best (one line per
source line, the hypothesis text as given; empty where a source line has no entry). With
--ref, prints both BLEU figures of the original and the rescored 1-best.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import NamedTuple, Sequence

from s2s_jax import bleu, cli, decode, translate
from s2s_jax.data import sources


class Entry(NamedTuple):
  id: int
  hyp: str
  features: str
  score: float
  rest: tuple[str, ...]  # fields after the score, kept as they are


def read_nbest(path: str, num_sources: int) -> list[Entry]:
  """Parses a Moses n-best file; a malformed line raises ValueError naming file and line."""
  entries = []
  for n, line in enumerate(sources.read_lines(path), 1):
    if not line:
      continue
    fields = [f.strip() for f in line.split("|||")]
    if len(fields) < 4:
      raise ValueError(f"{path}: line {n}: expected 'id ||| hypothesis ||| features ||| score', "
                       f"got {len(fields)} field(s)")
    try:
      idx = int(fields[0])
    except ValueError:
      raise ValueError(f"{path}: line {n}: sentence id {fields[0]!r} is not an integer") from None
    if not 0 <= idx < num_sources:
      raise ValueError(f"{path}: line {n}: sentence id {idx} is outside 0..{num_sources - 1} "
                       "(the source file's lines)")
    try:
      score = float(fields[3])
    except ValueError:
      raise ValueError(f"{path}: line {n}: score {fields[3]!r} is not a number") from None
    if not math.isfinite(score):
      raise ValueError(f"{path}: line {n}: score {fields[3]!r} is not finite")
    entries.append(Entry(idx, fields[1], fields[2], score, tuple(fields[4:])))
  if not entries:
    raise ValueError(f"{path}: no n-best entries")
  return entries


def rescore(m: translate.Loaded, src_lines: Sequence[str], entries: Sequence[Entry],
            weight: float, progress: bool = True) -> tuple[list[float], list[float]]:
  """(LSTM log-probabilities, combined scores) of every entry."""
  src_ids = translate.encode_sources(m, src_lines)
  tok = translate.tokenizer(m, "tgt")
  pairs = [(src_ids[e.id], m.tgt_vocab.encode(tok(e.hyp) if e.hyp else [])) for e in entries]
  lstm = decode.score_ids(m.params, m.model_cfg, pairs, m.cfg.decode.batch_size,
                          progress=progress)
  return lstm, [(1.0 - weight) * e.score + weight * lp for e, lp in zip(entries, lstm)]


def best_per_source(entries: Sequence[Entry], scores: Sequence[float],
                    num_sources: int) -> list[str]:
  """The hypothesis with the highest score for every source line (the first on ties; '' if none)."""
  best: dict[int, tuple[float, int]] = {}
  for i, (e, s) in enumerate(zip(entries, scores)):
    if e.id not in best or s > best[e.id][0]:
      best[e.id] = (s, i)
  return [entries[best[k][1]].hyp if k in best else "" for k in range(num_sources)]


def format_nbest(entries: Sequence[Entry], lstm: Sequence[float],
                 scores: Sequence[float]) -> list[str]:
  """Moses lines, each id's entries best first; `lstm= L` appended to the features."""
  order = sorted(range(len(entries)), key=lambda i: (entries[i].id, -scores[i], i))
  out = []
  for i in order:
    e = entries[i]
    features = f"{e.features} lstm= {lstm[i]:.6f}".strip()
    fields = [str(e.id), e.hyp, features, f"{scores[i]:.6f}", *e.rest]
    out.append(" ||| ".join(fields))
  return out


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.rescore",
                                   description=__doc__.split("\n")[0])
  translate.add_model_flags(parser, decode_fields=("batch_size",))
  parser.add_argument("--src", required=True, help="source sentences, one per line")
  parser.add_argument("--nbest", required=True, help="Moses n-best list of the source sentences")
  parser.add_argument("--ref", help="references: also print BLEU before and after rescoring")
  parser.add_argument("--weight", type=float, default=0.5,
                      help="weight of the LSTM log-probability (0.5 = the paper's even average)")
  parser.add_argument("--output", help="new 1-best file (default WORKDIR/rescore_<nbest>.1best)")
  parser.add_argument("--output_nbest",
                      help="rescored n-best file (default WORKDIR/rescore_<nbest>.nbest)")
  args = parser.parse_args(argv)
  if not 0.0 <= args.weight <= 1.0:
    parser.error(f"--weight must be in [0, 1], got {args.weight}")
  m = translate.load_from_flags(args)
  src = sources.read_lines(args.src)
  entries = read_nbest(args.nbest, len(src))
  lstm, scores = rescore(m, src, entries, args.weight)
  stem = os.path.join(args.workdir, "rescore_" + os.path.basename(args.nbest))
  out_1best, out_nbest = args.output or stem + ".1best", args.output_nbest or stem + ".nbest"
  new_best = best_per_source(entries, scores, len(src))
  translate.write_lines(new_best, out_1best)
  translate.write_lines(format_nbest(entries, lstm, scores), out_nbest)
  results = {"nbest": args.nbest, "entries": len(entries), "sentences": len(src),
             "weight": args.weight, "output": out_1best, "output_nbest": out_nbest,
             "checkpoint_steps": m.steps}
  if args.ref:
    refs = sources.read_lines(args.ref)
    if len(refs) != len(src):
      raise ValueError(f"{args.src} has {len(src)} lines but {args.ref} has {len(refs)}")
    kind, lang = m.cfg.data.tokenizer, m.cfg.data.tgt_lang
    old_best = best_per_source(entries, [e.score for e in entries], len(src))
    for key, hyps in (("baseline", old_best), ("rescored", new_best)):
      results[key] = bleu.score_translations([h.split() for h in hyps], refs, kind, lang, m.workdir)
      logging.info("%s 1-best: BLEU %.2f | tokenized BLEU %.2f", key, results[key]["bleu"],
                   results[key]["bleu_tok"])
  path = stem + ".json"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write("\n")
  print(json.dumps(results, indent=2, sort_keys=True))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
