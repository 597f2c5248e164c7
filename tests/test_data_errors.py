"""Bad input gives one clear line (a DataError, a ValueError) naming the file, line and problem."""

import os

import pytest

from s2s_jax.config import ConfigError, DataConfig
from s2s_jax.data import pipeline, sources
from s2s_jax.data.sources import DataError


def write(folder, files):
  os.makedirs(folder, exist_ok=True)
  for name, content in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
  return str(folder)


def good_files(**over):
  files = {f"{s}.{lang}": "a b\nc d\n" for s in sources.SPLITS for lang in ("en", "fr")}
  files.update(over)
  return files


def load_error(folder, **kw) -> str:
  cfg = DataConfig(**{"source": "text", "path": str(folder), "tokenizer": "none", **kw})
  with pytest.raises(DataError) as e:
    pipeline.load_corpus(cfg, None)
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in msg, msg
  return msg


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
  folder = write(tmp_path, good_files(**{"valid.fr": "x\ny\nz\n"}))
  msg = load_error(folder)
  assert f"{folder}/valid.en has 2 lines but {folder}/valid.fr has 3" in msg


def test_invalid_utf8_names_file_and_line(tmp_path):
  folder = write(tmp_path, good_files(**{"train.en": "a\nb\nc\n",
                                         "train.fr": b"ok\nfine\ncaf\xe9 au lait\n"}))
  msg = load_error(folder)
  assert msg.startswith(f"{folder}/train.fr: line 3: invalid UTF-8") and "byte 4" in msg


def test_missing_file_and_missing_language_name_the_path(tmp_path):
  files = good_files()
  del files["test.fr"]
  folder = write(tmp_path / "a", files)
  assert load_error(folder).startswith(f"{folder}/test.fr: file not found")
  folder = write(tmp_path / "b", good_files())
  msg = load_error(folder, tgt_lang="de")
  assert msg.startswith(f"{folder}/train.de: file not found")
  assert "languages found there: en, fr" in msg
  assert load_error(tmp_path / "nowhere").startswith(f"{tmp_path}/nowhere: folder not found")
  with pytest.raises(ConfigError, match="bad value '' for data.path"):  # refused up front
    load_error("")


def test_bad_settings_and_an_empty_training_set(tmp_path):
  folder = write(tmp_path, good_files())
  with pytest.raises(ConfigError, match="bad value 'csv' for data.source: allowed: one of "
                                        "synthetic, text, tfds"):
    load_error(folder, source="csv")
  with pytest.raises(ConfigError, match="bad value 'x' for data.tokenizer: allowed: one of "
                                        "moses, none, sentencepiece"):
    load_error(folder, tokenizer="x")
  msg = load_error(folder, max_len=1)
  assert msg == ("no training pairs left: 2 read, 0 with an empty side, 2 longer than "
                 "data.max_len=1")
  assert "needs a WORKDIR" in load_error(folder, tokenizer="sentencepiece")


def test_byte_order_mark_and_crlf_line_ends_are_not_text(tmp_path):
  folder = write(tmp_path, good_files(**{"train.en": b"\xef\xbb\xbfa b\r\n c\t\r\n"}))
  pairs = sources.read_split(DataConfig(source="text", path=folder), "train")
  assert pairs == [("a b", "a b"), ("c", "c d")]
