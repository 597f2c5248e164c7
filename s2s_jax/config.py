"""Experiment configuration: frozen dataclasses, command-line overrides, JSON round trip.

A preset (see `experiments/`) is a plain function returning a `Config`. Any field can be
overridden from the command line as `--section.field=value` (or `--section.field value`);
values are parsed according to the field's declared type, and an unknown name is an error
that lists the valid ones. Configs are stored as JSON data in the WORKDIR and parsed back
the same way: nothing read from a file is ever executed.

Every value is checked against `ALLOWED` (one line per field) whenever a section is built:
presets, command-line overrides and config.json alike, before any data is read or anything is
written. A bad value is a `ConfigError` of one line that names the field, the value and what
is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import json
import math
import typing
from typing import Any, Callable, Mapping, Sequence

import optax

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")  # model.compute_dtype's values
KERNELS = ("auto", "plain", "cpu")  # model.kernels' values
DATA_SOURCES = ("synthetic", "text", "tfds")  # data.source's values
TOKENIZERS = ("moses", "none", "sentencepiece")  # data.tokenizer's values
SCHEDULES = ("paper", "constant")  # optim.schedule's values
STRATEGIES = ("mesh", "pmap", "layers")  # parallel.strategy's values
ATTENTION = ("none", "dot", "general", "concat", "location", "additive")  # model.attention's
ENCODERS = ("uni", "bi")  # model.encoder's values


class _Checked:
  """Base of the config sections: a section checks its values against `ALLOWED` when built."""

  def __post_init__(self):
    check_section(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Checked):
  num_layers: int = 4  # LSTM layers in the encoder and (separately) in the decoder
  hidden_size: int = 1000  # cells per LSTM layer
  embed_size: int = 1000  # word embedding size, source and target
  init_scale: float = 0.08  # every parameter starts U(-init_scale, init_scale)
  compute_dtype: str = "float32"  # float32 | bfloat16 | auto: matmul operand dtype (params stay
                                  # f32); auto = bfloat16 where the hardware has bf16 dot products,
                                  # else float32, fixed when a run starts
  kernels: str = "auto"  # auto | plain | cpu: plain JAX, or s2s_jax/cpu_kernels.py
                         # (hand-written backward passes, faster on XLA:CPU); auto = cpu on a CPU
                         # backend, plain elsewhere
  dropout: float = 0.0  # Zaremba et al. (2014): drop rate on the non-recurrent connections
                        # (embeddings, between layers, before the softmax) while training;
                        # 0 = off (the paper)
  attention: str = "none"  # none (the paper) | dot | general | concat
                           # | location (Luong et al. 2015 global attention)
                           # | additive (Bahdanau et al. 2015) over the encoder's top layer
  attention_positions: int = 100  # attention=location: source positions its weights cover (later
                                  # positions of a longer source get no weight)
  input_feeding: bool = False  # feed the attentional vector of step t-1 to the decoder with y_{t-1}
                               # (Luong et al. 2015; needs attention)
  encoder: str = "uni"  # uni (the paper) | bi: the first encoder layer bidirectional, hidden_size/2
                        # cells a direction (GNMT)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Checked):
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
  bucket_growth: float = 0.2  # each padded length >= (1 + this) x the previous one
                              # (0 = every multiple)
  tfds_name: str = "wmt14_translate/fr-en"  # TFDS builder/config for source=tfds
  tfds_data_dir: str = ""  # TFDS data_dir ("" = TFDS default)
  tfds_manual_dir: str = ""  # folder holding manually downloaded WMT files for TFDS
  download: bool = True  # source=tfds: download and prepare a dataset that is not prepared, when
                         # the download hosts answer (false: never download)
  synthetic_train: int = 100_000  # embedded corpus: training pairs
  synthetic_valid: int = 2_000  # embedded corpus: validation pairs
  synthetic_test: int = 2_000  # embedded corpus: test pairs
  synthetic_seed: int = 0  # embedded corpus: generator seed
  max_eval_sentences: int = 0  # cap on validation sentences used for perplexity (0 = all)
  prepared_dir: str = ""  # data store shared by runs
                          # ("" = $S2S_JAX_DATA or ~/.cache/s2s_jax/prepared)
  workers: int = 0  # tokenizer processes when preparing a corpus (0 = one per CPU core)


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Checked):
  name: str = "sgd"  # any optax optimizer factory by name: sgd, adam, adafactor, ...
  learning_rate: float = 0.7  # base learning rate
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # extra optimizer kwargs
                                                                       # (JSON on the CLI)
  clip_norm: float = 5.0  # global-norm clip of the loss gradient (0 = off)
  schedule: str = "paper"  # paper (constant, then halve every half epoch) | constant
  decay_start_epoch: float = 5.0  # epoch of the first halving (the paper's "after 5 epochs")
  decay_every_epochs: float = 0.5  # then halve again every this many epochs
  decay_factor: float = 0.5  # multiply the rate by this at each decay step
  label_smoothing: float = 0.0  # training loss on targets smoothed by optax.smooth_labels (weight
                                # this spread over the vocabulary); 0 = the paper's NLL


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Checked):
  batch_size: int = 128  # sentences per step (global, over all devices)
  num_epochs: float = 7.5  # training length in epochs, used when num_steps == 0
  num_steps: int = 0  # training length in steps (0 = derive from num_epochs)
  eval_every: int = 1000  # steps between validation perplexity evaluations (0 = only at the end)
  checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
  keep_checkpoints: int = 3  # how many recent checkpoints to keep
  log_every: int = 50  # steps between training metric lines, and between the loop's waits for the
                       # devices (finite flags; with many processes, agreeing to stop on a signal)
  seed: int = 0  # parameter init and batch order
  eval_batch_size: int = 128  # sentences per validation batch
  max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (0 = never)
  allow_config_change: bool = False  # resume a WORKDIR whose config.json differs (see workdir.py)


@dataclasses.dataclass(frozen=True)
class DecodeConfig(_Checked):
  beam_size: int = 12  # live hypotheses kept (1 = greedy)
  nbest: int = 1  # complete hypotheses returned per sentence
  max_len_a: float = 1.5  # maximum output length = floor(a * source length) + b, </s> included
  max_len_b: int = 10  # see max_len_a
  length_penalty: float = 0.0  # GNMT alpha; 0 = the paper (no length normalisation)
  batch_size: int = 64  # sentences decoded together
  max_input_len: int = 200  # source tokens kept when translating; longer inputs are cut (warning)


@dataclasses.dataclass(frozen=True)
class ParallelConfig(_Checked):
  strategy: str = "mesh"  # mesh (jit over a NamedSharding mesh) | pmap | layers (the paper's:
                          # LSTM layer l on device l, a wavefront over time, the softmax on
                          # `model` more devices)
  data: int = -1  # data-parallel mesh size (-1 = all devices / model;
                  # layers: all devices / (model.num_layers + model))
  model: int = 1  # devices sharing the target softmax (the paper split it over 4;
                  # under layers they hold no LSTM layer)
  distributed: bool = False  # call jax.distributed.initialize() (multi-host)


class ConfigError(ValueError):
  """A config field name or value that cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------- allowed values


@dataclasses.dataclass(frozen=True)
class Allowed:
  """What one field accepts: `test(value, section)`, and `text`, what that is in words after
  the field's type ("an integer" + " >= 1"; a text starting with ": " replaces the type).
  `detail(section)` adds the values of other fields that the test compares with."""
  test: Callable[[Any, Any], bool]
  text: str
  detail: Callable[[Any], str] = lambda section: ""


def at_least(lo: float, note: str = "") -> Allowed:
  return Allowed(lambda v, s: v >= lo, f" >= {lo}{note}")


def above(lo: float, note: str = "") -> Allowed:
  return Allowed(lambda v, s: v > lo, f" > {lo}{note}")


def one_of(*values: str) -> Allowed:
  return Allowed(lambda v, s: v in values, f": one of {', '.join(values)}")


def any_text(note: str) -> Allowed:
  """Any string; `note` says what it names."""
  return Allowed(lambda v, s: True, f" ({note})")


ANY = Allowed(lambda v, s: True, "")
LANGUAGE = Allowed(lambda v, s: bool(v) and not set(v) & set(" /\\\t\n"),
                   ": a language code (not empty, no spaces or slashes)")


def optax_factory(name: str) -> Callable | None:
  """optax.<name> if it is an optimizer factory (a public function taking learning_rate)."""
  factory = getattr(optax, name, None)
  if name.startswith("_") or not callable(factory):
    return None
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return None
  return factory if "learning_rate" in params else None


def optax_arguments(name: str) -> tuple[list[str], bool]:
  """(the arguments optax.<name> takes besides learning_rate, whether it takes **kwargs)."""
  params = inspect.signature(optax_factory(name)).parameters
  return ([p for p in params if p != "learning_rate"],
          any(p.kind == p.VAR_KEYWORD for p in params.values()))


def _known_arguments(kwargs: Mapping[str, Any], section: Any) -> bool:
  if optax_factory(section.name) is None:
    return True  # optim.name is refused first
  names, any_name = optax_arguments(section.name)
  return any_name or all(k in names for k in kwargs)


# One line per field: what it accepts besides its type (finite numbers, integers, strings,
# booleans, a JSON object). tests/test_config.py fails for a field missing here, and checks
# that docs/reliability.md lists the same table.
ALLOWED: dict[str, Allowed] = {
    "model.num_layers": at_least(1),
    "model.hidden_size": at_least(1),
    "model.embed_size": at_least(1),
    "model.init_scale": above(0),
    "model.compute_dtype": one_of(*COMPUTE_DTYPES),
    "model.kernels": one_of(*KERNELS),
    "model.dropout": Allowed(lambda v, s: 0 <= v < 1, " in [0, 1) (0 = off)"),
    "model.attention": one_of(*ATTENTION),
    "model.attention_positions": at_least(1),
    "model.input_feeding": Allowed(lambda v, s: not v or s.attention != "none",
                                   " (true needs model.attention)"),
    "model.encoder": Allowed(lambda v, s: v in ENCODERS and (v == "uni" or s.hidden_size % 2 == 0),
                             ": uni or bi (bi needs an even model.hidden_size)"),
    "data.source": one_of(*DATA_SOURCES),
    "data.path": Allowed(lambda v, s: bool(v) or s.source != "text",
                         " (a folder; not empty when data.source=text)"),
    "data.src_lang": LANGUAGE,
    "data.tgt_lang": LANGUAGE,
    "data.reverse_source": ANY,
    "data.max_len": at_least(0, " (0 = no limit)"),
    "data.src_vocab_size": at_least(1),
    "data.tgt_vocab_size": at_least(1),
    "data.tokenizer": one_of(*TOKENIZERS),
    "data.spm_vocab_size": at_least(1),
    "data.bucket_width": at_least(1),
    "data.bucket_growth": at_least(0, " (0 = every multiple of data.bucket_width)"),
    "data.tfds_name": Allowed(lambda v, s: bool(v), ": a TFDS builder name (not empty)"),
    "data.tfds_data_dir": any_text("a folder; empty = TFDS's default"),
    "data.tfds_manual_dir": any_text("a folder, or empty"),
    "data.download": ANY,
    "data.synthetic_train": at_least(1),
    "data.synthetic_valid": at_least(1),
    "data.synthetic_test": at_least(1),
    "data.synthetic_seed": at_least(0),
    "data.max_eval_sentences": at_least(0, " (0 = all)"),
    "data.prepared_dir": any_text("a folder; empty = the default"),
    "data.workers": at_least(0, " (0 = one per CPU core)"),
    "optim.name": Allowed(lambda v, s: optax_factory(v) is not None,
                          ": an optax optimizer (sgd, adam, adamw, adafactor, rmsprop, lion, ...)"),
    "optim.learning_rate": above(0),
    "optim.kwargs": Allowed(_known_arguments, " of arguments of the optimizer optim.name",
                            lambda s: f"; optax.{s.name} takes "
                                      f"{', '.join(optax_arguments(s.name)[0])}"),
    "optim.clip_norm": at_least(0, " (0 = off)"),
    "optim.schedule": one_of(*SCHEDULES),
    "optim.decay_start_epoch": at_least(0),
    "optim.decay_every_epochs": above(0),
    "optim.decay_factor": Allowed(lambda v, s: 0 < v <= 1, " in (0, 1]"),
    "optim.label_smoothing": Allowed(lambda v, s: 0 <= v < 1, " in [0, 1) (0 = off)"),
    "train.batch_size": at_least(1),
    "train.num_epochs": above(0),
    "train.num_steps": at_least(0, " (0 = from train.num_epochs)"),
    "train.eval_every": at_least(0, " (0 = only at the end)"),
    "train.checkpoint_every": at_least(0, " (0 = only at the end)"),
    "train.keep_checkpoints": at_least(1),
    "train.log_every": at_least(1),
    "train.seed": at_least(0),
    "train.eval_batch_size": at_least(1),
    "train.max_bad_steps": at_least(0, " (0 = never stop)"),
    "train.allow_config_change": ANY,
    "decode.beam_size": at_least(1),
    "decode.nbest": Allowed(lambda v, s: 1 <= v <= s.beam_size, " from 1 to decode.beam_size",
                            lambda s: f"; decode.beam_size is {s.beam_size}"),
    "decode.max_len_a": at_least(0),
    "decode.max_len_b": at_least(0),
    "decode.length_penalty": at_least(0, " (0 = none, the paper's)"),
    "decode.batch_size": at_least(1),
    "decode.max_input_len": at_least(1),
    "parallel.strategy": one_of(*STRATEGIES),
    "parallel.data": Allowed(lambda v, s: v == -1 or v >= 1,
                             ": an integer, -1 (all devices) or >= 1"),
    "parallel.model": at_least(1),
    "parallel.distributed": ANY,
}
TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string",
              bool: "true or false"}  # and "a JSON object" for a mapping


@functools.cache
def _field_annotations(section_cls: type) -> dict[str, Any]:
  hints = typing.get_type_hints(section_cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _type_ok(value: Any, annotation: Any) -> bool:
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  if annotation is str:
    return isinstance(value, str)
  return isinstance(value, Mapping)


def _section_name(cls: type) -> str:
  """ModelConfig -> model: a section's name in `Config` and on the command line."""
  return cls.__name__.removesuffix("Config").lower()


def describe(name: str) -> str:
  """What the field `section.field` accepts, in words (the table of docs/reliability.md)."""
  sec, fld = name.split(".", 1)
  cls = {_section_name(c): c for c in _Checked.__subclasses__()}[sec]
  said = ALLOWED[name].text
  if said.startswith(": "):
    return said[2:]
  return TYPE_WORDS.get(_field_annotations(cls)[fld], "a JSON object") + said


def check_section(section: Any) -> None:
  """Raises ConfigError (one line: the field, the value, what is allowed) for the first field
  of a config section whose value its type or `ALLOWED` refuses."""
  sec = _section_name(type(section))
  for fld, annotation in _field_annotations(type(section)).items():
    name, value = f"{sec}.{fld}", getattr(section, fld)
    if name not in ALLOWED:
      raise ConfigError(f"{name} has no entry in config.ALLOWED")
    rule = ALLOWED[name]
    if not _type_ok(value, annotation) or not rule.test(value, section):
      raise ConfigError(f"bad value {value!r} for {name}: allowed: {describe(name)}"
                        f"{rule.detail(section)}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  decode: DecodeConfig = DecodeConfig()
  parallel: ParallelConfig = ParallelConfig()


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
  except (ValueError, TypeError, json.JSONDecodeError):
    raise ConfigError(f"bad value {text!r} for {name}: allowed: {describe(name)}") from None
  raise ConfigError(f"field {name} has an unsupported type {annotation}")


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


def parse_args(argv: Sequence[str],
               extra_flags: Sequence[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
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
