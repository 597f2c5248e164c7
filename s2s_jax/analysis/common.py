"""Shared by the analyses: evaluation sentences, 1-best translation, output paths, JSON."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from s2s_jax import translate
from s2s_jax.config import Config
from s2s_jax.data import sources


def add_eval_flags(parser) -> None:
  """--split or --src/--ref (the sentences to translate and score), and --out."""
  parser.add_argument("--split", default="test",
                      help="split of the WORKDIR's corpus to evaluate (ignored with --src/--ref)")
  parser.add_argument("--src", help="source sentences, one per line (with --ref)")
  parser.add_argument("--ref", help="reference translations, one per line (with --src)")
  parser.add_argument("--max_sentences", type=int, default=0,
                      help="use only the first N sentences (0 = all)")
  parser.add_argument("--out", help="folder for the outputs (default: the WORKDIR)")


def eval_sentences(cfg: Config, split: str = "test", src: str | None = None,
                   ref: str | None = None,
                   max_sentences: int = 0) -> tuple[list[str], list[str], str]:
  """(source lines, reference lines, a name for them) from --src/--ref files or a corpus split."""
  if bool(src) != bool(ref):
    raise ValueError("--src and --ref go together: give both files or neither "
                     "(then --split is used)")
  if src:
    srcs, refs = sources.read_lines(src), sources.read_lines(ref)
    if len(srcs) != len(refs):
      raise ValueError(f"{src} has {len(srcs)} lines but {ref} has {len(refs)}: "
                       "one reference per source line is needed")
    name = src
  else:
    if split not in sources.SPLITS:
      raise ValueError(f"--split must be one of {', '.join(sources.SPLITS)}, got {split!r}")
    pairs = sources.read_split(cfg.data, split)  # that split alone
    srcs, refs = [s for s, _ in pairs], [t for _, t in pairs]
    name = f"{cfg.data.source} {split}"
  keep = [i for i, s in enumerate(srcs) if s.strip()]
  if max_sentences > 0:
    keep = keep[:max_sentences]
  if not keep:
    raise ValueError(f"{name}: no non-empty source sentences to evaluate")
  return [srcs[i] for i in keep], [refs[i] for i in keep], name


def translate_tokens(m: translate.Loaded, lines: Sequence[str], name: str = "input",
                     progress: bool = True) -> list[list[str]]:
  """1-best target tokens of every source line, in order."""
  results = translate.translate_lines(m, lines, name, progress=progress)
  return [m.tgt_vocab.decode(r[0].tokens) if r else [] for r in results]


def out_dir(args) -> str:
  folder = args.out or args.workdir
  os.makedirs(folder, exist_ok=True)
  return folder


def write_json(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
