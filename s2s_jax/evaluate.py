"""Evaluate a model or an ensemble: both BLEU figures and perplexity.

    python -m s2s_jax.evaluate --workdir DIR --src FILE --ref FILE [--beam_size B]
        [--ensemble DIR2 ...] [--output FILE] [--replace_unk [--unk_dict FILE]]
    python -m s2s_jax.evaluate --workdir DIR --split test
    python -m s2s_jax.evaluate --workdir DIR --testset wmt14/full

BLEU (see `s2s_jax.bleu`): standard sacreBLEU on detokenized output with its signature, and
the paper's cased BLEU on tokenized text (multi-bleu.pl style). Perplexity: exp of the mean
NLL per target token (</s> included) over the pairs with a non-empty source and target, as in
training (`decode.perplexity`), under the ensemble's combined distribution. `--split NAME`
evaluates that split of the configured corpus (its raw pairs from `sources.read_split`, which
reads that split alone, encoded with the WORKDIR's saved vocabularies), so it gives the same
figures as --src/--ref on the same files. `--testset NAME` evaluates a sacreBLEU test set in
the model's language pair, fetched once through sacreBLEU's cache (`s2s_jax.data.testsets`).
Results are printed as JSON and written to WORKDIR/eval_<name>.json. --replace_unk
[--unk_dict FILE] (attention models): unknown-word replacement before scoring, as in
`s2s_jax.translate` (perplexity is unchanged).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any, Mapping, Sequence

import jax

from s2s_jax import bleu, cli, decode, ensemble, translate
from s2s_jax.data import pipeline, sources, testsets


def perplexity(m: translate.Loaded, pairs: Sequence[tuple[str, str]]) -> tuple[float, float, int]:
  """(mean NLL per token, perplexity, tokens) of raw (source, target) pairs, empty sides skipped."""
  cfg = m.cfg
  tok_src, tok_tgt = translate.tokenizer(m, "src"), translate.tokenizer(m, "tgt")
  examples = []
  for s, t in pairs:
    st, tt = tok_src(s), tok_tgt(t)
    if st and tt:
      examples.append(pipeline.encode_pair(st, tt, m.src_vocab, m.tgt_vocab,
                                           cfg.data.reverse_source))
  eval_fn = jax.jit(functools.partial(ensemble.eval_step, cfg=m.model_cfg))
  batches = pipeline.eval_batches(examples, cfg.train.eval_batch_size, cfg.data.bucket_width,
                                  cfg.data.bucket_growth)
  nll, ppl = decode.perplexity(eval_fn, m.params, batches)
  return nll, ppl, sum(len(t) for _, t in examples)


def evaluate(m: translate.Loaded, pairs: Sequence[tuple[str, str]], name: str,
             progress: bool = True, unk_dict: Mapping[str, str] | None = None
             ) -> tuple[dict[str, Any], list[list[str]]]:
  """Translates the sources, scores them against the targets. Returns (results, output tokens).
  `unk_dict`: replace unknown words (`translate.output_words`; {} copies the source word)."""
  tokens = translate.source_tokens(m, [s for s, _ in pairs], name, m.cfg.decode.max_input_len)
  results = translate.translate_tokens(m, tokens, progress, alignment=unk_dict is not None)
  hyp_tokens = [translate.output_words(m, r[0], toks, unk_dict) for r, toks in zip(results, tokens)]
  scores = bleu.score_translations(hyp_tokens, [t for _, t in pairs], m.cfg.data.tokenizer,
                                   m.cfg.data.tgt_lang, m.workdir)
  nll, ppl, tokens = perplexity(m, pairs)
  d = m.cfg.decode
  out = {"name": name, "sentences": len(pairs), **scores, "perplexity": ppl, "nll_per_token": nll,
         "ppl_tokens": tokens, "beam_size": d.beam_size, "length_penalty": d.length_penalty,
         "max_len_a": d.max_len_a, "max_len_b": d.max_len_b, "checkpoint_steps": m.steps,
         "replace_unk": unk_dict is not None}
  return out, hyp_tokens


def save_results(results: dict[str, Any], workdir: str) -> str:
  """WORKDIR/eval_<name>.json (eval_<name>_replace_unk.json with unknown-word replacement)."""
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in results["name"])
  safe += "_replace_unk" if results.get("replace_unk") else ""
  path = os.path.join(workdir, f"eval_{safe}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write("\n")
  return path


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.evaluate",
                                   description=__doc__.split("\n")[0])
  translate.add_model_flags(parser)
  parser.add_argument("--src", help="source sentences, one per line")
  parser.add_argument("--ref", help="reference translations, one per line")
  parser.add_argument("--split", help="evaluate this split of the configured corpus (e.g. test)")
  parser.add_argument("--testset", help="evaluate this sacreBLEU test set (e.g. wmt14/full)")
  parser.add_argument("--output", help="also write the translations (detokenized) to this file")
  translate.add_unk_flags(parser)
  args = parser.parse_args(argv)
  unk_dict = translate.unk_dict_from_flags(args)
  if (bool(args.split) + bool(args.src or args.ref) + bool(args.testset) != 1
      or bool(args.src) != bool(args.ref)):
    parser.error("give either --src FILE and --ref FILE, --split NAME or --testset NAME")
  m = translate.load_from_flags(args)
  if args.testset:
    pairs, name = testsets.load(args.testset, m.cfg.data.src_lang, m.cfg.data.tgt_lang)
  elif args.split:
    pairs, name = sources.read_split(m.cfg.data, args.split), args.split
  else:
    src, ref = sources.read_lines(args.src), sources.read_lines(args.ref)
    if len(src) != len(ref):
      raise ValueError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}: "
                       "one reference per source line is needed")
    pairs, name = list(zip(src, ref)), os.path.basename(args.src)
  results, hyp_tokens = evaluate(m, pairs, name, unk_dict=unk_dict)
  if args.output:
    detok = translate.detokenizer(m)
    translate.write_lines([detok(t) for t in hyp_tokens], args.output)
  results["results_file"] = save_results(results, args.workdir)
  logging.info("BLEU %.2f (%s) | tokenized BLEU %.2f | perplexity %.3f", results["bleu"],
               results["signature"], results["bleu_tok"], results["perplexity"])
  print(json.dumps(results, indent=2, sort_keys=True))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
