"""Table 3: the longest test sentences, their translations and the references, as markdown.

    python -m s2s_jax.analysis.long_examples --workdir DIR [--ensemble DIR2 ...] [--beam_size B]
        [--split test | --src FILE --ref FILE] [--num 5] [--out DIR]

The --num sentences with the most source words (the model's tokenizer; ties: the earlier
sentence) are translated (1-best) and printed longest first with their sentence-level
sacreBLEU. Writes table3.md and table3.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from s2s_jax import cli, translate
from s2s_jax.analysis import by_length, common


def longest(lengths: Sequence[int], num: int) -> list[int]:
  """Indices of the `num` largest lengths, longest first, earlier index first among equals."""
  return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:num]


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
  lines = [f"{title}\n", "| # | words | source | model | reference | sentence BLEU |",
           "|---|---|---|---|---|---|"]
  for n, r in enumerate(rows, 1):
    lines.append(f"| {n} | {r['length']} | {_cell(r['source'])} | {_cell(r['translation'])} | "
                 f"{_cell(r['reference'])} | {r['sentence_bleu']:.1f} |")
  return "\n".join(lines) + "\n"


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.analysis.long_examples",
                                   description=__doc__.split("\n")[0])
  translate.add_model_flags(parser, ("beam_size", "batch_size", "max_len_a", "max_len_b",
                                     "length_penalty"))
  common.add_eval_flags(parser)
  parser.add_argument("--num", type=int, default=5, help="how many sentences")
  args = parser.parse_args(argv)
  m = translate.load_from_flags(args)
  srcs, refs, name = common.eval_sentences(m.cfg, args.split, args.src, args.ref,
                                           args.max_sentences)
  tok = translate.tokenizer(m, "src")
  pick = longest([len(tok(s)) for s in srcs], args.num)
  hyp_tokens = common.translate_tokens(m, [srcs[i] for i in pick], name, progress=False)
  detok = translate.detokenizer(m)
  from sacrebleu.metrics import BLEU
  sent_bleu = BLEU(effective_order=True)
  rows = []
  for i, hyp in zip(pick, hyp_tokens):
    text = detok(hyp)
    rows.append({"index": i, "length": len(tok(srcs[i])), "source": srcs[i], "translation": text,
                 "reference": refs[i],
                 "sentence_bleu": sent_bleu.sentence_score(text, [refs[i]]).score})
  scores = by_length.scorer(m)(hyp_tokens, [refs[i] for i in pick])
  title = (f"The {len(rows)} longest sentences of {name} ({len(m.steps)} model(s), beam "
           f"{m.cfg.decode.beam_size}; BLEU on these {scores['bleu']:.2f}, tokenized "
           f"{scores['bleu_tok']:.2f})")
  folder = common.out_dir(args)
  table = markdown(rows, title)
  common.write_text(os.path.join(folder, "table3.md"), table)
  common.write_json(os.path.join(folder, "table3.json"),
                    {"rows": rows, "bleu": scores, "data": name, "steps": m.steps,
                     "workdirs": [args.workdir] + list(args.ensemble),
                     "beam_size": m.cfg.decode.beam_size})
  print(table)
  logging.info("wrote table3.md and table3.json in %s", folder)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
