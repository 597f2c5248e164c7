"""Translate sentences with a trained model or an ensemble of models.

    python -m s2s_jax.translate --workdir DIR [--beam_size B] [--nbest N] [--ensemble DIR2 ...]
        [--input FILE] [--output FILE] [--replace_unk [--unk_dict FILE]] [--align]

Reads one source sentence per line (stdin or --input) and writes one translation per line,
in input order (sentences are sorted by length internally and the order restored). Empty
lines give empty lines, so line counts always match. With --nbest N > 1 the output is a Moses
n-best list instead: `id ||| tokens ||| logp= L len= n ||| score`, up to N lines per sentence (ids
from 0; one empty entry for an empty line). Decoding defaults come from the WORKDIR's
config.json `decode` section; flags override them. Inputs longer than decode.max_input_len
tokens are cut to that many (first) tokens, with a warning.

Attention models (model.attention): --replace_unk replaces each <unk> of the output by the
source word it attends to most (Luong et al. 2015), through --unk_dict FILE where that has the
word; --align prints each output as its tokens, ` ||| `, and Moses-style pairs `i-j` (source
word i, counted from 0 in the order written, is the one output token j attends to most).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from s2s_jax import cli, decode, ensemble, model
from s2s_jax import config as config_lib
from s2s_jax.config import Config, ConfigError, DecodeConfig, ModelConfig
from s2s_jax.data import pipeline, sources, tokenize
from s2s_jax.data.vocab import UNK, Vocab

MAX_WARNINGS = 5  # truncation warnings printed line by line before a summary


class Loaded(NamedTuple):
  cfg: Config  # the (first) WORKDIR's config, decode section with flag overrides applied
  params: model.Params  # one model's params, or a stacked ensemble
  src_vocab: Vocab
  tgt_vocab: Vocab
  steps: list[int]  # checkpoint step of each member
  workdir: str  # the first WORKDIR (its config, vocabularies and tokenizer models are used)
  members: tuple[ModelConfig, ...] | None = None  # an ensemble of different members: theirs

  @property
  def model_cfg(self) -> ensemble.ModelCfg:
    """The model config(s) that decoding and scoring take with `params`."""
    return self.cfg.model if self.members is None else self.members


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
  cfg, params, src_vocab, tgt_vocab, steps, model_cfg = ensemble.load(workdirs)
  cfg = config_lib.override(cfg, decode_updates or {})  # checked: see config.ALLOWED
  logging.info("loaded %d model(s) from %s at step(s) %s", len(steps), ", ".join(workdirs), steps)
  return Loaded(cfg, params, src_vocab, tgt_vocab, steps, workdirs[0],
                model_cfg if isinstance(model_cfg, tuple) else None)


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


def source_tokens(m: Loaded, lines: Sequence[str], name: str = "input",
                  max_len: int | None = None) -> list[list[str]]:
  """Source tokens in reading order; lines longer than `max_len` tokens keep their first
  `max_len` (with a warning)."""
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
    out.append(toks)
  if cut > MAX_WARNINGS:
    logging.warning("%s: %d lines truncated in all", name, cut)
  return out


def encode_sources(m: Loaded, lines: Sequence[str], name: str = "input",
                   max_len: int | None = None) -> list[list[int]]:
  """Source ids in encoder order; lines longer than `max_len` tokens keep their first `max_len`."""
  return [pipeline.encode_source(toks, m.src_vocab, m.cfg.data.reverse_source)
          for toks in source_tokens(m, lines, name, max_len)]


def translate_tokens(m: Loaded, tokens: Sequence[Sequence[str]], progress: bool = True,
                     alignment: bool = False) -> list[list[decode.Translation]]:
  """N-best translations (target ids) of tokenized sources (`source_tokens`), in order.
  `alignment`: with each hypothesis's attention weights (Translation.attention)."""
  ids = [pipeline.encode_source(toks, m.src_vocab, m.cfg.data.reverse_source) for toks in tokens]
  return decode.translate_ids(m.params, m.model_cfg, ids, m.cfg.decode, progress=progress,
                              alignment=alignment)


def translate_lines(m: Loaded, lines: Sequence[str], name: str = "input",
                    progress: bool = True) -> list[list[decode.Translation]]:
  """N-best translations (target ids) of raw source lines, in order."""
  return translate_tokens(m, source_tokens(m, lines, name, m.cfg.decode.max_input_len), progress)


# ---------------------------------------------------------------------------------------------
# Unknown-word replacement and alignments, from the attention weights of each hypothesis.

def read_unk_dict(path: str) -> dict[str, str]:
  """A dictionary file for --unk_dict: `source_word target_word` a line (space or tab; the
  first entry of a word wins; blank lines skipped)."""
  table: dict[str, str] = {}
  for n, line in enumerate(sources.read_lines(path), 1):
    if not line:
      continue
    fields = line.split()
    if len(fields) != 2:
      raise sources.DataError(f"{path}: line {n}: expected 'source_word target_word', got "
                              f"{len(fields)} field(s)")
    table.setdefault(fields[0], fields[1])
  return table


def source_position(s: int, length: int, reverse_source: bool) -> int:
  """The index in the source as written of encoder position s (reversed sources read it last
  word first)."""
  return length - 1 - s if reverse_source else s


def aligned_sources(m: Loaded, h: decode.Translation) -> list[int]:
  """For every output token of `h`, the source word (its index as written) it attends to most."""
  if h.attention is None:
    raise ValueError("the hypothesis has no attention weights (translate with alignment=True)")
  length = h.attention.shape[1]
  return [source_position(int(np.argmax(row)), length, m.cfg.data.reverse_source)
          for row in h.attention]


def output_words(m: Loaded, h: decode.Translation, src_tokens: Sequence[str],
                 unk_dict: Mapping[str, str] | None = None) -> list[str]:
  """The target words of `h`. With `unk_dict` (--replace_unk; {} copies), every <unk> becomes
  the source word it attends to most, or that word's entry in `unk_dict` (Luong et al. 2015)."""
  words = m.tgt_vocab.decode(h.tokens)
  if unk_dict is None or UNK not in words:
    return words
  where = aligned_sources(m, h)
  return [unk_dict.get(src_tokens[where[t]], src_tokens[where[t]]) if w == UNK else w
          for t, w in enumerate(words)]


def format_output(m: Loaded, results: Sequence[Sequence[decode.Translation]],
                  src_tokens: Sequence[Sequence[str]] | None = None,
                  unk_dict: Mapping[str, str] | None = None, align: bool = False) -> list[str]:
  """Detokenized 1-best lines, or Moses n-best lines when decode.nbest > 1. `unk_dict`: replace
  unknown words (`output_words`, needs `src_tokens`). `align`: each 1-best line is instead the
  output tokens, ` ||| ` and the alignment `i-j ...` (source word i, as written and from 0, is
  the one output token j attends to most); n-best lines get it as a fifth field."""
  words = lambda i, h: output_words(m, h, src_tokens[i] if src_tokens else [], unk_dict)
  pairs = lambda h: " ".join(f"{i}-{j}" for j, i in enumerate(aligned_sources(m, h)))
  if m.cfg.decode.nbest == 1:
    if align:
      return [f"{' '.join(words(i, r[0]))} ||| {pairs(r[0])}" if r[0].tokens else ""
              for i, r in enumerate(results)]
    detok = detokenizer(m)
    return [detok(words(i, r[0])) if r[0].tokens else "" for i, r in enumerate(results)]
  out = []
  for i, nbest in enumerate(results):
    for h in nbest:
      feats = f"logp= {h.log_prob:.6f} len= {len(h.tokens) + 1}"
      line = f"{i} ||| {' '.join(words(i, h))} ||| {feats} ||| {h.score:.6f}"
      out.append(line + (" ||| " + (pairs(h) if h.tokens else "") if align else ""))
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


def add_unk_flags(parser: argparse.ArgumentParser) -> None:
  """--replace_unk and --unk_dict (attention models)."""
  parser.add_argument("--replace_unk", action="store_true",
                      help="replace each <unk> in the output by the source word with the highest "
                           "attention weight (attention models)")
  parser.add_argument("--unk_dict", metavar="FILE",
                      help="with --replace_unk: translate the copied word through this file of "
                           "'source_word target_word' lines where it has an entry")


def unk_dict_from_flags(args: argparse.Namespace) -> dict[str, str] | None:
  """The replacement table --replace_unk / --unk_dict ask for: None (no replacement), {} (copy)
  or the file's entries."""
  if args.unk_dict and not args.replace_unk:
    raise ConfigError("--unk_dict is the dictionary of --replace_unk: pass both")
  if not args.replace_unk:
    return None
  return read_unk_dict(args.unk_dict) if args.unk_dict else {}


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.translate",
                                   description=__doc__.split("\n")[0])
  add_model_flags(parser)
  parser.add_argument("--input", help="source sentences, one per line (default: stdin)")
  parser.add_argument("--output", help="where to write translations (default: stdout)")
  add_unk_flags(parser)
  parser.add_argument("--align", action="store_true",
                      help="print the output tokens and their alignment to the source words "
                           "(attention models; see format_output)")
  args = parser.parse_args(argv)
  unk_dict = unk_dict_from_flags(args)
  m = load_from_flags(args)
  lines, name = read_input(args.input)
  tokens = source_tokens(m, lines, name, m.cfg.decode.max_input_len)
  results = translate_tokens(m, tokens, alignment=unk_dict is not None or args.align)
  write_lines(format_output(m, results, tokens, unk_dict, args.align), args.output)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
