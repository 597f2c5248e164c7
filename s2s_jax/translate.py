"""Translate sentences with a trained model or an ensemble of models.

    python -m s2s_jax.translate --workdir DIR [--beam_size B] [--nbest N] [--ensemble DIR2 ...]
        [--input FILE] [--output FILE]

Reads one source sentence per line (stdin or --input) and writes one translation per line,
in input order (sentences are sorted by length internally and the order restored). Empty
lines give empty lines, so line counts always match. With --nbest N > 1 the output is a Moses
n-best list instead: `id ||| tokens ||| logp= L len= n ||| score`, up to N lines per sentence (ids
from 0; one empty entry for an empty line). Decoding defaults come from the WORKDIR's
config.json `decode` section; flags override them. Inputs longer than decode.max_input_len
tokens are cut to that many (first) tokens, with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from s2s_jax import cli
from s2s_jax import config as config_lib
from s2s_jax import decode
from s2s_jax import ensemble
from s2s_jax import model
from s2s_jax.config import Config, DecodeConfig
from s2s_jax.data import pipeline, sources, tokenize
from s2s_jax.data.vocab import Vocab

MAX_WARNINGS = 5  # truncation warnings printed line by line before a summary


class Loaded(NamedTuple):
  cfg: Config  # the (first) WORKDIR's config, decode section with flag overrides applied
  params: model.Params  # one model's params, or a stacked ensemble
  src_vocab: Vocab
  tgt_vocab: Vocab
  steps: list[int]  # checkpoint step of each member
  workdir: str  # the first WORKDIR (its config, vocabularies and tokenizer models are used)


def add_model_flags(parser: argparse.ArgumentParser,
                    decode_fields: Sequence[str] | None = None) -> None:
  """--workdir, --ensemble and --FIELD overrides of decode.FIELD (all fields unless listed)."""
  parser.add_argument("--workdir", required=True,
                      help="training WORKDIR (config.json, vocabularies, checkpoints)")
  parser.add_argument("--ensemble", nargs="+", default=[], metavar="DIR",
                      help="more WORKDIRs decoded together with --workdir (same vocabularies)")
  if decode_fields is None:
    decode_fields = [f.name for f in dataclasses.fields(DecodeConfig)]
  for name in decode_fields:
    parser.add_argument(f"--{name}", dest=f"decode.{name}", default=None,
                        help=f"overrides decode.{name} of config.json")


def load(workdirs: Sequence[str], decode_updates: Mapping[str, Any] | None = None) -> Loaded:
  """The model of one WORKDIR, or the ensemble of several, with `{'decode.field': value}`
  overrides (strings are parsed by the field's type) applied to the first one's config."""
  cfg, params, src_vocab, tgt_vocab, steps = ensemble.load(workdirs)
  cfg = config_lib.override(cfg, decode_updates or {})  # checked: see config.ALLOWED
  logging.info("loaded %d model(s) from %s at step(s) %s", len(steps), ", ".join(workdirs), steps)
  return Loaded(cfg, params, src_vocab, tgt_vocab, steps, workdirs[0])


def load_from_flags(args: argparse.Namespace) -> Loaded:
  """`load` for the flags of `add_model_flags`."""
  updates = {k: v for k, v in vars(args).items() if k.startswith("decode.") and v is not None}
  return load([args.workdir] + list(args.ensemble), updates)


def tokenizer(m: Loaded, side: str) -> Callable[[str], list[str]]:
  """The corpus tokenizer of the source ("src") or target ("tgt") side."""
  lang = m.cfg.data.src_lang if side == "src" else m.cfg.data.tgt_lang
  return tokenize.tokenizer(m.cfg.data.tokenizer, lang, workdir=m.workdir)


def detokenizer(m: Loaded) -> Callable[[Sequence[str]], str]:
  """Target tokens -> text."""
  return tokenize.detokenizer(m.cfg.data.tokenizer, m.cfg.data.tgt_lang, workdir=m.workdir)


def encode_sources(m: Loaded, lines: Sequence[str], name: str = "input",
                   max_len: int | None = None) -> list[list[int]]:
  """Source ids in encoder order; lines longer than `max_len` tokens keep their first `max_len`."""
  tok = tokenizer(m, "src")
  out, cut = [], 0
  for n, line in enumerate(lines, 1):
    toks = tok(line) if line.strip() else []
    if max_len is not None and len(toks) > max_len:
      cut += 1
      if cut <= MAX_WARNINGS:
        logging.warning("%s: line %d: %d source tokens; truncated to the first %d "
                        "(decode.max_input_len)", name, n, len(toks), max_len)
      toks = toks[:max_len]
    out.append(pipeline.encode_source(toks, m.src_vocab, m.cfg.data.reverse_source))
  if cut > MAX_WARNINGS:
    logging.warning("%s: %d lines truncated in all", name, cut)
  return out


def translate_lines(m: Loaded, lines: Sequence[str], name: str = "input",
                    progress: bool = True) -> list[list[decode.Translation]]:
  """N-best translations (target ids) of raw source lines, in order."""
  ids = encode_sources(m, lines, name, m.cfg.decode.max_input_len)
  return decode.translate_ids(m.params, m.cfg.model, ids, m.cfg.decode, progress=progress)


def format_output(m: Loaded, results: Sequence[Sequence[decode.Translation]]) -> list[str]:
  """Detokenized 1-best lines, or Moses n-best lines when decode.nbest > 1."""
  if m.cfg.decode.nbest == 1:
    detok = detokenizer(m)
    return [detok(m.tgt_vocab.decode(r[0].tokens)) if r[0].tokens else "" for r in results]
  out = []
  for i, nbest in enumerate(results):
    for h in nbest:
      words = " ".join(m.tgt_vocab.decode(h.tokens))
      feats = f"logp= {h.log_prob:.6f} len= {len(h.tokens) + 1}"
      out.append(f"{i} ||| {words} ||| {feats} ||| {h.score:.6f}")
  return out


def read_input(path: str | None) -> tuple[list[str], str]:
  """Lines of --input (`sources.read_lines`) or of stdin, read the same way; a name for messages."""
  if path:
    return sources.read_lines(path), path
  raw = sys.stdin.buffer.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise sources.DataError(f"<stdin>: line {line}: invalid UTF-8 ({e.reason})") from None
  lines = text.removeprefix("\ufeff").split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line.strip() for line in lines], "<stdin>"


def write_lines(lines: Sequence[str], path: str | None) -> None:
  text = "".join(line + "\n" for line in lines)
  if path:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.flush()


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.translate",
                                   description=__doc__.split("\n")[0])
  add_model_flags(parser)
  parser.add_argument("--input", help="source sentences, one per line (default: stdin)")
  parser.add_argument("--output", help="where to write translations (default: stdout)")
  args = parser.parse_args(argv)
  m = load_from_flags(args)
  lines, name = read_input(args.input)
  results = translate_lines(m, lines, name)
  write_lines(format_output(m, results), args.output)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
