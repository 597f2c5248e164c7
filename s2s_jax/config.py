"""Experiment configuration: frozen dataclasses, command-line overrides, JSON round trip.

A preset (see `experiments/`) is a plain function returning a `Config`. Any field can be
overridden from the command line as `--section.field=value` (or `--section.field value`);
values are parsed according to the field's declared type, and an unknown name is an error
that lists the valid ones. Configs are stored as JSON data in the WORKDIR and parsed back
the same way: nothing read from a file is ever executed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import typing
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_layers: int = 4  # LSTM layers in the encoder and (separately) in the decoder
  hidden_size: int = 1000  # cells per LSTM layer
  embed_size: int = 1000  # word embedding size, source and target
  init_scale: float = 0.08  # every parameter starts U(-init_scale, init_scale)
  compute_dtype: str = "float32"  # float32 | bfloat16 | auto: matmul operand dtype (params stay f32); auto = bfloat16 where the hardware has bf16 dot products, else float32, fixed when a run starts
  kernels: str = "auto"  # auto | plain | cpu: plain JAX, or s2s_jax/cpu_kernels.py (hand-written backward passes, faster on XLA:CPU); auto = cpu on a CPU backend, plain elsewhere


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"  # synthetic | text | tfds
  path: str = ""  # folder with train/valid/test.{src_lang,tgt_lang} for source=text
  src_lang: str = "en"  # source language code (file suffix for source=text)
  tgt_lang: str = "fr"  # target language code
  reverse_source: bool = True  # feed source words in reverse order (the paper's trick)
  max_len: int = 50  # drop training pairs with more tokens than this on either side (0 = no limit)
  src_vocab_size: int = 160_000  # most frequent source tokens kept (plus specials)
  tgt_vocab_size: int = 80_000  # most frequent target tokens kept (plus specials)
  tokenizer: str = "moses"  # moses | none (pre-tokenized, split on spaces) | sentencepiece
  spm_vocab_size: int = 8000  # sentencepiece model size when tokenizer=sentencepiece
  bucket_width: int = 2  # padded lengths are multiples of this: a bounded set of compiled shapes
  bucket_growth: float = 0.2  # each padded length >= (1 + this) x the previous one (0 = every multiple)
  tfds_name: str = "wmt14_translate/fr-en"  # TFDS builder/config for source=tfds
  tfds_data_dir: str = ""  # TFDS data_dir ("" = TFDS default)
  tfds_manual_dir: str = ""  # folder holding manually downloaded WMT files for TFDS
  download: bool = True  # source=tfds: download and prepare a dataset that is not prepared, when the download hosts answer (false: never download)
  synthetic_train: int = 100_000  # embedded corpus: training pairs
  synthetic_valid: int = 2_000  # embedded corpus: validation pairs
  synthetic_test: int = 2_000  # embedded corpus: test pairs
  synthetic_seed: int = 0  # embedded corpus: generator seed
  max_eval_sentences: int = 0  # cap on validation sentences used for perplexity (0 = all)
  prepared_dir: str = ""  # data store shared by runs ("" = $S2S_JAX_DATA or ~/.cache/s2s_jax/prepared)
  workers: int = 0  # tokenizer processes when preparing a corpus (0 = one per CPU core)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "sgd"  # any optax optimizer factory by name: sgd, adam, adafactor, ...
  learning_rate: float = 0.7  # base learning rate
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # extra optimizer kwargs (JSON on the CLI)
  clip_norm: float = 5.0  # global-norm clip of the loss gradient (0 = off)
  schedule: str = "paper"  # paper (constant, then halve every half epoch) | constant
  decay_start_epoch: float = 5.0  # epoch of the first halving (the paper's "after 5 epochs")
  decay_every_epochs: float = 0.5  # then halve again every this many epochs
  decay_factor: float = 0.5  # multiply the rate by this at each decay step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 128  # sentences per step (global, over all devices)
  num_epochs: float = 7.5  # training length in epochs, used when num_steps == 0
  num_steps: int = 0  # training length in steps (0 = derive from num_epochs)
  eval_every: int = 1000  # steps between validation perplexity evaluations (0 = only at the end)
  checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
  keep_checkpoints: int = 3  # how many recent checkpoints to keep
  log_every: int = 50  # steps between training metric lines, and between the loop's waits for the devices (finite flags; with many processes, agreeing to stop on a signal)
  seed: int = 0  # parameter init and batch order
  eval_batch_size: int = 128  # sentences per validation batch
  max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (0 = never)
  allow_config_change: bool = False  # resume a WORKDIR whose config.json differs (see workdir.py)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  beam_size: int = 12  # live hypotheses kept (1 = greedy)
  nbest: int = 1  # complete hypotheses returned per sentence
  max_len_a: float = 1.5  # maximum output length = a * source length + b
  max_len_b: int = 10  # see max_len_a
  length_penalty: float = 0.0  # GNMT alpha; 0 = the paper (no length normalisation)
  batch_size: int = 64  # sentences decoded together
  max_input_len: int = 200  # source tokens kept when translating; longer inputs are cut (warning)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  strategy: str = "mesh"  # mesh (jit over a NamedSharding mesh) | pmap | layers (the paper's: LSTM layer l on device l, a wavefront over time, the softmax on `model` more devices)
  data: int = -1  # data-parallel mesh size (-1 = all devices / model; layers: all devices / (model.num_layers + model))
  model: int = 1  # devices sharing the target softmax (the paper split it over 4; under layers they hold no LSTM layer)
  distributed: bool = False  # call jax.distributed.initialize() (multi-host)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  decode: DecodeConfig = DecodeConfig()
  parallel: ParallelConfig = ParallelConfig()


class ConfigError(ValueError):
  """A config field name or value that cannot be used; the message says which and why."""


def _section_types(cfg: Config) -> dict[str, type]:
  return {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def field_names(cfg: Config) -> list[str]:
  """All overridable names as `section.field`."""
  names = []
  for sec in dataclasses.fields(cfg):
    for f in dataclasses.fields(getattr(cfg, sec.name)):
      names.append(f"{sec.name}.{f.name}")
  return names


def _parse_value(name: str, text: Any, annotation: Any) -> Any:
  """Parses `text` (a string, or a JSON value) to the field type `annotation`."""
  origin = typing.get_origin(annotation)
  try:
    if annotation is bool:
      if isinstance(text, bool):
        return text
      low = str(text).strip().lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError("expected true or false")
    if annotation is int:
      if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError("expected an integer")
      return int(text) if not isinstance(text, str) else int(text.replace("_", ""))
    if annotation is float:
      if isinstance(text, bool):
        raise ValueError("expected a number")
      return float(text)
    if annotation is str:
      if not isinstance(text, str):
        raise ValueError("expected a string")
      return text
    if origin in (collections.abc.Mapping, dict) or annotation in (dict, Mapping):
      value = json.loads(text) if isinstance(text, str) else text
      if not isinstance(value, dict):
        raise ValueError("expected a JSON object such as {\"b1\": 0.9}")
      return dict(value)
  except (ValueError, TypeError, json.JSONDecodeError) as e:
    raise ConfigError(f"bad value {text!r} for {name}: {e}") from None
  raise ConfigError(f"field {name} has an unsupported type {annotation}")


def _field_annotations(section_cls: type) -> dict[str, Any]:
  return typing.get_type_hints(section_cls)


def override(cfg: Config, updates: Mapping[str, Any]) -> Config:
  """Returns `cfg` with `{'section.field': value}` applied (values parsed by type)."""
  sections: dict[str, dict[str, Any]] = {}
  valid = field_names(cfg)
  for name, raw in updates.items():
    if name not in valid:
      close = difflib.get_close_matches(name, valid, n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(
          f"unknown config field '{name}'.{hint} Valid fields: {', '.join(valid)}")
    sec, fld = name.split(".", 1)
    hints = _field_annotations(type(getattr(cfg, sec)))
    sections.setdefault(sec, {})[fld] = _parse_value(name, raw, hints[fld])
  for sec, vals in sections.items():
    cfg = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **vals)})
  return cfg


def parse_args(argv: Sequence[str], extra_flags: Sequence[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
  """Splits `--a.b=v` / `--a.b v` arguments into (config updates, other flags).

  `extra_flags` are the non-config flags the caller accepts (e.g. `workdir`); any other
  argument without a dot is an error.
  """
  updates: dict[str, str] = {}
  extras: dict[str, str] = {}
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--"):
      raise ConfigError(f"unexpected argument '{arg}': use --section.field=value")
    key = arg[2:]
    if "=" in key:
      key, value = key.split("=", 1)
    elif i + 1 < len(args) and not args[i + 1].startswith("--"):
      value = args[i + 1]
      i += 1
    else:
      value = "true"
    key = key.replace("-", "_")
    if "." in key:
      updates[key] = value
    elif key in extra_flags:
      extras[key] = value
    else:
      raise ConfigError(
          f"unknown flag '--{key}'. Flags: {', '.join('--' + f for f in extra_flags)}, "
          "or --section.field=value for a config field")
    i += 1
  return updates, extras


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
  return {f.name: dict(dataclasses.asdict(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}


def from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
  """Builds a Config from nested data (as in config.json), validating every name and type."""
  base = base or Config()
  if not isinstance(data, Mapping):
    raise ConfigError("a config must be a JSON object of sections")
  flat = {}
  for sec, vals in data.items():
    if not isinstance(vals, Mapping):
      raise ConfigError(f"config section '{sec}' must be an object")
    for k, v in vals.items():
      if (sec, k) == ("model", "custom_vjp"):  # a config.json written before model.kernels
        k, v = "kernels", "auto" if v else "plain"
      flat[f"{sec}.{k}"] = v
  return override(base, flat)


def save_json(cfg: Config, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
    f.write("\n")


def load_json(path: str) -> Config:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
  try:
    return from_dict(data)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def diff(a: Config, b: Config) -> list[str]:
  """Names of the fields that differ between two configs, as `section.field: a -> b`."""
  out = []
  da, db = to_dict(a), to_dict(b)
  for sec in da:
    for k in da[sec]:
      if da[sec][k] != db[sec][k]:
        out.append(f"{sec}.{k}: {da[sec][k]!r} -> {db[sec][k]!r}")
  return out
