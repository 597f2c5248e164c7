"""Where sentence pairs come from. Every source returns {split: [(source, target), ...]} of raw text.

- synthetic: the embedded English->French grammar corpus (`s2s_jax.data.synthetic`).
- text: a folder with train/valid/test.{src_lang,tgt_lang}, UTF-8, one sentence a line.
- tfds: a TFDS translation dataset (default wmt14_translate/fr-en).
"""

from __future__ import annotations

import os

from s2s_jax.config import DataConfig

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
  """A corpus that cannot be read; the message names the file and what to do."""


def load_pairs(cfg: DataConfig) -> dict[str, list[tuple[str, str]]]:
  if cfg.source == "synthetic":
    from s2s_jax.data import synthetic
    return synthetic.make_splits(cfg.synthetic_train, cfg.synthetic_valid, cfg.synthetic_test,
                                 seed=cfg.synthetic_seed)
  if cfg.source == "text":
    return {split: read_text_pair(cfg.path, split, cfg.src_lang, cfg.tgt_lang) for split in SPLITS}
  raise DataError(f"data.source must be synthetic, text or tfds, got {cfg.source!r}")


def read_lines(path: str) -> list[str]:
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  with open(path, "rb") as f:
    raw = f.read().split(b"\n")
  if raw and raw[-1] == b"":
    raw.pop()
  out = []
  for n, line in enumerate(raw, 1):
    try:
      out.append(line.decode("utf-8").rstrip("\r").strip())
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: line {n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
  return out


def read_text_pair(folder: str, split: str, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
  src_path = os.path.join(folder, f"{split}.{src_lang}")
  tgt_path = os.path.join(folder, f"{split}.{tgt_lang}")
  src, tgt = read_lines(src_path), read_lines(tgt_path)
  if len(src) != len(tgt):
    raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                    "a parallel corpus needs one target line per source line")
  return list(zip(src, tgt))
