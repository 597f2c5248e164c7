"""Moses tokenization speed: s2s_jax.data.moses against sacremoses, same sentences, one core.

  python -m benchmarks.moses [--from DIR] [--sentences 20000]

Tokenizes the first N lines of DIR's train.en and train.fr (the embedded grammar's pairs when
no DIR is given) with both, checks that every sentence gets the same tokens, and reports
microseconds a sentence and the speed-up, per language.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time


def sentences(source: str, lang: str, n: int) -> list[str]:
  if source:
    with open(os.path.join(source, f"train.{lang}"), encoding="utf-8") as f:
      return [line.strip() for line in itertools.islice(f, n)]
  from s2s_jax.data import synthetic
  return [p[0 if lang == "en" else 1] for p in synthetic.generate_pairs(n, seed=0)]


def timed(fn, texts: list[str]) -> tuple[float, list[list[str]]]:
  t0 = time.perf_counter()
  out = [fn(t) for t in texts]
  return time.perf_counter() - t0, out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--from", dest="source", default="", help="text folder with train.{en,fr}")
  p.add_argument("--sentences", type=int, default=20000)
  args = p.parse_args()
  import sacremoses

  from s2s_jax.data import moses
  print(f"sacremoses {sacremoses.__version__}, {args.sentences} sentences of "
        f"{args.source or 'the embedded grammar'}")
  print(f"{'lang':>4} {'sacremoses us':>13} {'s2s_jax us':>10} {'speed-up':>8} {'same':>5}")
  for lang in ("en", "fr"):
    texts = sentences(args.source, lang, args.sentences)
    ref = sacremoses.MosesTokenizer(lang=lang)
    fast = moses.MosesTokenizer(lang)
    t_ref, want = timed(lambda s: ref.tokenize(s, escape=False), texts)
    t_fast, got = timed(fast.tokenize, texts)
    print(f"{lang:>4} {t_ref / len(texts) * 1e6:>13.1f} {t_fast / len(texts) * 1e6:>10.1f} "
          f"{t_ref / t_fast:>7.2f}x {str(got == want):>5}")


if __name__ == "__main__":
  main()
