"""The attention matrix of one sentence: which source words each output word attends to.

    python -m s2s_jax.analysis.attention --workdir DIR --sentence "a source sentence" [--out DIR]
        [--ensemble DIR2 ...] [--beam_size B]

Translates the sentence (1-best; with an ensemble the weights are the mean over its attention
members) and draws the weights of every output token over the source words as a grey-scale
matrix: one row per output token, one column per source word in the order written (a reversed
source is put back), darker = more weight. Writes attention.png and attention.json (the
tokens, the weights, and each output token's most-attended source word). Needs a model trained
with model.attention.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from s2s_jax import cli, translate
from s2s_jax.analysis import common


def attention_matrix(m: translate.Loaded, sentence: str) -> dict[str, Any]:
  """{source tokens, output tokens, weights (output x source, source as written), alignment}."""
  tokens = translate.source_tokens(m, [sentence], "--sentence", m.cfg.decode.max_input_len)
  if not tokens[0]:
    raise ValueError("--sentence has no tokens")
  best = translate.translate_tokens(m, tokens, progress=False, alignment=True)[0][0]
  weights = best.attention[:, ::-1] if m.cfg.data.reverse_source else best.attention
  return {"source": tokens[0], "output": m.tgt_vocab.decode(best.tokens),
          "weights": np.asarray(weights, np.float64).round(6).tolist(),
          "alignment": translate.aligned_sources(m, best), "log_prob": best.log_prob}


def plot(result: dict[str, Any], path: str, title: str) -> None:
  plt = common.pyplot()
  src, out = result["source"], result["output"]
  weights = np.asarray(result["weights"]).reshape(len(out), len(src))
  fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(src) + 2), max(3.0, 0.4 * len(out) + 2)))
  ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(src)), src, rotation=60, ha="right", fontsize=9)
  ax.set_yticks(range(len(out)), out, fontsize=9)
  ax.set_xlabel("source")
  ax.set_ylabel("output")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.analysis.attention",
                                   description=__doc__.split("\n")[0])
  translate.add_model_flags(parser, ("beam_size", "max_len_a", "max_len_b", "length_penalty"))
  parser.add_argument("--sentence", required=True, help="the source sentence")
  parser.add_argument("--out", help="folder for attention.png and attention.json "
                                    "(default: the WORKDIR)")
  args = parser.parse_args(argv)
  m = translate.load_from_flags(args)
  result = attention_matrix(m, args.sentence)
  result.update(workdir=args.workdir, steps=m.steps)
  folder = common.out_dir(args)
  png, data = os.path.join(folder, "attention.png"), os.path.join(folder, "attention.json")
  plot(result, png, f"{os.path.basename(os.path.normpath(args.workdir))} step {m.steps[0]}")
  common.write_json(data, result)
  logging.info("wrote %s and %s", png, data)
  print(" ".join(result["output"]))
  print(" ".join(f"{i}-{j}" for j, i in enumerate(result["alignment"])))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
