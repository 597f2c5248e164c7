"""Table 1 of the paper at any scale: direction, depth, beam size, ensembles, trained and measured.

    python -m experiments.ablations --workdir DIR [--base quickstart|wmt14|<preset>]
        [--split test] [--max_sentences N] [--only GROUP,...] [--section.field=value ...]

The overrides apply to the base preset (`experiments.<base>.config()`); every model below is
that config with at most three fields changed:
  reversed-L{d}-seed{s}  data.reverse_source=true,  model.num_layers=d, train.seed=s
  forward-L{d}-seed{s}   data.reverse_source=false, ...
Models trained (the base has L layers and seed S): reversed-L-S (the base), forward-L-S,
reversed at the other depths of 1, 2, 4, and reversed-L at seeds S+1..S+4 (as the paper's
ensemble members: different initialisation and minibatch order, both from train.seed). Each
lives in its own DIR/models/<name> WORKDIR, so an interrupted training resumes.

Rows (all decoded on the test split): single models at beam 12; the base at beams 1 and 2;
ensembles of 2 and 5 (the base and the next seeds) at beams 1, 2 and 12 as in the paper's
Table 1. Per row: BLEU both ways (`s2s_jax.bleu`), test perplexity (the ensemble's combined
distribution for ensembles) on all test pairs and, when data.max_len limits training, on the
test pairs within that length (the others measure length extrapolation), training words/s
(source + target words, single models) and decoding words/s (source + output words per
second of search, measured on one batch decoded again after compilation; decode_s in the JSON
is the whole decode with compilation). Results go to DIR/table1.json as each row completes and
DIR/table1.md (with the paper's BLEU next to ours and the measured findings); a rerun skips
finished trainings and rows. A DIR keeps one base config: a rerun with another one is refused
(use a new DIR).
--only base,forward,depth,beam,member,ensemble runs just those row groups (and trains only
their models), e.g. `--only base,depth` for a depth study at a larger scale.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from s2s_jax import bleu, cli, evaluate, train, translate
from s2s_jax import config as config_lib
from s2s_jax.analysis import common
from s2s_jax.config import Config, ConfigError
from s2s_jax.data import pipeline
from s2s_jax.workdir import METRICS_FILE

TABLE_JSON = "table1.json"
TABLE_MD = "table1.md"
MODELS_DIR = "models"
DEPTHS = (1, 2, 4)  # the paper: each extra layer cut perplexity by nearly 10%
BEAMS = (1, 2, 12)  # the paper: 1 already works well, 2 gives most of the benefit, 12 the largest
ENSEMBLE_SIZES = (2, 5)
BIG_BEAM = 12
GROUPS = ("base", "forward", "depth", "beam", "member", "ensemble")  # row groups (--only)

TrainFn = Callable[[Config, str], dict[str, Any]]  # (config, WORKDIR) -> train.train's result
EvalFn = Callable[[Sequence[str], int, str, int], dict[str, Any]]  # (WORKDIRs, beam, split, max)
LengthFn = Callable[[Sequence[str], str, int], dict[str, Any]]  # (WORKDIRs, split, max)


@dataclasses.dataclass(frozen=True)
class Row:
  key: str  # stable id in table1.json
  label: str  # the table's first column
  group: str  # one of GROUPS
  models: tuple[str, ...]  # model names; several = an ensemble
  beam_size: int
  layers: int  # LSTM layers of the model(s)
  paper_bleu: float | None = None  # the paper's Table 1 figure for this row, where it has one


def model_name(reverse: bool, layers: int, seed: int) -> str:
  return f"{'reversed' if reverse else 'forward'}-L{layers}-seed{seed}"


def plan(base: Config) -> tuple[dict[str, dict[str, Any]], list[Row]]:
  """(model name -> config overrides, in training order; rows in display order)."""
  depth, seed = base.model.num_layers, base.train.seed
  models: dict[str, dict[str, Any]] = {}

  def add(rev: bool, d: int, s: int) -> str:
    name = model_name(rev, d, s)
    models[name] = {"data.reverse_source": rev, "model.num_layers": d, "train.seed": s}
    return name

  top = add(True, depth, seed)
  fwd = add(False, depth, seed)
  others = {d: add(True, d, seed) for d in DEPTHS if d != depth}
  members = [top] + [add(True, depth, seed + k) for k in range(1, max(ENSEMBLE_SIZES))]
  layers = lambda d: f"{d} layer{'s' if d > 1 else ''}"
  single = lambda name, b: f"single-{name}-beam{b}"
  rows = [Row(single(fwd, BIG_BEAM), f"Single forward LSTM ({layers(depth)}), beam {BIG_BEAM}",
              "forward", (fwd,), BIG_BEAM, depth, 26.17),
          Row(single(top, BIG_BEAM), f"Single reversed LSTM ({layers(depth)}), beam {BIG_BEAM}",
              "base", (top,), BIG_BEAM, depth, 30.59)]
  for d, name in sorted(others.items()):
    rows.append(Row(single(name, BIG_BEAM), f"Single reversed LSTM ({layers(d)}), beam {BIG_BEAM}",
                    "depth", (name,), BIG_BEAM, d))
  for b in BEAMS:
    if b != BIG_BEAM:
      rows.append(Row(single(top, b), f"Single reversed LSTM ({layers(depth)}), beam {b}", "beam",
                      (top,), b, depth))
  for k, name in enumerate(members[1:], 1):
    rows.append(Row(single(name, BIG_BEAM),
                    f"Single reversed LSTM ({layers(depth)}), seed {seed + k}, beam {BIG_BEAM}",
                    "member", (name,), BIG_BEAM, depth))
  paper = {(5, 1): 33.00, (2, 12): 33.27, (5, 2): 34.50, (5, 12): 34.81}
  for size, b in ((5, 1), (2, 12), (5, 2), (5, 12)):
    rows.append(Row(f"ensemble{size}-{top}-beam{b}", f"Ensemble of {size} reversed LSTMs, beam {b}",
                    "ensemble", tuple(members[:size]), b, depth, paper[(size, b)]))
  return models, rows


def work_order(models: dict[str, Any], rows: Sequence[Row]) -> list[Row]:
  """Rows in the order their last model is trained (so results appear as early as possible)."""
  rank = {name: i for i, name in enumerate(models)}
  return sorted(rows, key=lambda r: max(rank[m] for m in r.models))


def load_base(name: str) -> Config:
  try:
    module = importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError:
    raise ConfigError(f"--base {name}: no preset experiments/{name}.py") from None
  if not hasattr(module, "config"):
    raise ConfigError(f"--base {name}: experiments/{name}.py has no config() function")
  return module.config()


def _jsonable(data: Any) -> Any:
  return json.loads(json.dumps(data, sort_keys=True))


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def median_train_wps(workdir: str) -> float | None:
  """Median training words/s of the WORKDIR's metrics.jsonl (the first line holds compilation)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  values = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("kind") == "train" and "words_per_s" in rec:
        values.append(float(rec["words_per_s"]))
  values = values[1:] or values
  return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------
# The default train and evaluate functions (the runner takes any with the same signatures).

def train_model(cfg: Config, workdir: str) -> dict[str, Any]:
  return train.train(cfg, workdir, progress=False)


@functools.lru_cache(maxsize=4)
def _eval_pairs(data_cfg: Any, split: str, max_sentences: int) -> tuple[tuple[str, str], ...]:
  srcs, refs, _ = common.eval_sentences(Config(data=data_cfg), split, max_sentences=max_sentences)
  return tuple(zip(srcs, refs))


def steady_decode_wps(m: Any, lines: Sequence[str], ids: Sequence[Sequence[int]]) -> float:
  """Decoding words/s without compilation: the middle length-sorted batch, decoded again.

  Decoding sorts the sentences by length and decodes decode.batch_size of them at a time;
  decoding one such batch again reuses its compiled program. Words: source + output tokens.
  """

  bs = m.cfg.decode.batch_size
  order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: (len(ids[i]), i))
  start = (len(order) // bs // 2) * bs
  chunk = order[start:start + bs]
  t0 = time.perf_counter()
  out = translate.translate_lines(m, [lines[i] for i in chunk], "timing", progress=False)
  seconds = time.perf_counter() - t0
  words = sum(len(ids[i]) for i in chunk) + sum(len(r[0].tokens) for r in out if r)
  return words / max(seconds, 1e-9)


def within_training_length(m: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """The pairs training would have kept: at most data.max_len tokens a side (all if 0)."""

  limit = m.cfg.data.max_len
  if limit <= 0:
    return list(pairs)
  tok_src, tok_tgt = translate.tokenizer(m, "src"), translate.tokenizer(m, "tgt")
  return [(s, t) for s, t in pairs if pipeline.within_length(tok_src(s), tok_tgt(t), limit)]


def _in_length(m: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:

  short = within_training_length(m, pairs)
  if not short or len(short) == len(pairs):  # no split to report
    return {"in_length_ppl": None, "in_length_sentences": len(short)}
  return {"in_length_ppl": evaluate.perplexity(m, short)[1], "in_length_sentences": len(short)}


def in_length_perplexity(workdirs: Sequence[str], split: str = "test",
                         max_sentences: int = 0) -> dict[str, Any]:
  """Perplexity of one model or an ensemble on the test pairs within the training length
  (`within_training_length`): the test sentences longer than every training pair measure
  length extrapolation as much as translation quality."""

  m = translate.load(list(workdirs))
  return _in_length(m, _eval_pairs(dataclasses.replace(m.cfg.data, reverse_source=True), split,
                                   max_sentences))


def evaluate_models(workdirs: Sequence[str], beam_size: int, split: str = "test",
                    max_sentences: int = 0, replace_unk: bool = False) -> dict[str, Any]:
  """BLEU both ways, test perplexity (all pairs, and those within the training length) and
  decoding speed of one model or an ensemble; `replace_unk`: with unknown-word replacement
  (attention models, `translate.output_words`)."""

  m = translate.load(list(workdirs), {"decode.beam_size": beam_size, "decode.nbest": 1})
  # The raw pairs do not depend on the source direction; share them between models.
  pairs = _eval_pairs(dataclasses.replace(m.cfg.data, reverse_source=True), split, max_sentences)
  srcs, refs = [s for s, _ in pairs], [t for _, t in pairs]
  start = time.perf_counter()
  tokens = translate.source_tokens(m, srcs, split, m.cfg.decode.max_input_len)
  results = translate.translate_tokens(m, tokens, progress=False, alignment=replace_unk)
  seconds = time.perf_counter() - start
  unk_dict = {} if replace_unk else None
  hyp_tokens = [translate.output_words(m, r[0], t, unk_dict) if r else []
                for r, t in zip(results, tokens)]
  scores = bleu.score_translations(hyp_tokens, refs, m.cfg.data.tokenizer, m.cfg.data.tgt_lang,
                                   workdir=m.workdir)
  _, ppl, _ = evaluate.perplexity(m, pairs)
  ids = translate.encode_sources(m, srcs, split, m.cfg.decode.max_input_len)
  return {"bleu": scores["bleu"], "bleu_tok": scores["bleu_tok"], "signature": scores["signature"],
          "test_ppl": ppl, "decode_s": seconds, "decode_wps": steady_decode_wps(m, srcs, ids),
          "sentences": len(pairs), "steps": list(m.steps), **_in_length(m, pairs)}


# --------------------------------------------------------------------------------------------
# The runner.

def run(base: Config, workdir: str, *, train_fn: TrainFn = train_model,
        evaluate_fn: EvalFn = evaluate_models, length_fn: LengthFn = in_length_perplexity,
        split: str = "test", max_sentences: int = 0, only: Sequence[str] = (),
        meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains what is missing, evaluates the rows not yet done, writes the table after each row.

  Rows done by an older version without the within-training-length perplexity get it from
  `length_fn` (a perplexity pass only: no training, no decoding).

  `only`: row groups to run (see `Row.group`; empty = all); the others stay "not run".
  Returns the table's JSON data. Stops early (data saved, "interrupted": true) when a
  training was interrupted by a signal.
  """
  unknown = sorted(set(only) - set(GROUPS))
  if unknown:
    raise ConfigError(f"--only: unknown row group(s) {', '.join(unknown)}; "
                      f"groups: {', '.join(GROUPS)}")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, TABLE_JSON)
  cfg_dict = _jsonable(config_lib.to_dict(base))
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        table = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); move it away to "
                        "start the table again") from None
    if table.get("config") != cfg_dict:
      changed = config_lib.diff(config_lib.from_dict(table.get("config", {})), base)
      raise ConfigError(f"{path}: this DIR holds a table made with another config ("
                        f"{'; '.join(changed) or 'unreadable'}); rerun with the same base and "
                        "overrides, or use a new --workdir")
  else:
    table = {"config": cfg_dict, "models": {}, "rows": {}}
  table.update({"split": split, "max_sentences": max_sentences, **(meta or {})})
  table["interrupted"] = False
  table["only"] = sorted(only)
  table["failed"] = {}  # rows whose evaluation raised in this run (not in "rows": retried on rerun)
  models, rows = plan(base)

  def save():
    _write(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
    _write(os.path.join(workdir, TABLE_MD), markdown(table, rows))

  def ensure_trained(name: str) -> bool:
    if name in table["models"]:
      return True
    sub = os.path.join(workdir, MODELS_DIR, name)
    cfg = config_lib.override(base, models[name])
    logging.info("training %s in %s", name, sub)
    start = time.perf_counter()
    result = train_fn(cfg, sub)
    seconds = time.perf_counter() - start
    if result.get("interrupted"):
      logging.warning("training %s interrupted; rerun the same command to resume", name)
      return False
    table["models"][name] = _jsonable({
        "workdir": sub, "overrides": models[name], "seconds_this_run": seconds,
        "step": result.get("step"), "valid_ppl": result.get("valid_ppl"),
        "train_wps": median_train_wps(sub)})
    logging.info("trained %s: step %s, valid ppl %s, %.0f s", name, result.get("step"),
                 result.get("valid_ppl"), seconds)
    save()
    return True

  save()
  for row in work_order(models, [r for r in rows if not only or r.group in only]):
    if row.key in table["rows"]:
      rec = table["rows"][row.key]
      if "in_length_ppl" not in rec:
        logging.info("row done already, adding its within-training-length perplexity: %s",
                     row.label)
        rec.update(_jsonable(length_fn([table["models"][m]["workdir"] for m in row.models], split,
                                       max_sentences)))
        save()
      else:
        logging.info("row done already: %s", row.label)
      continue
    if not all(ensure_trained(m) for m in row.models):
      table["interrupted"] = True
      save()
      return table
    logging.info("evaluating: %s", row.label)
    try:
      rec = dict(evaluate_fn([table["models"][m]["workdir"] for m in row.models], row.beam_size,
                             split, max_sentences))
    except Exception as e:  # keep training the other models; a rerun retries this row
      logging.exception("evaluating %s failed; continuing (a rerun retries it)", row.label)
      table["failed"][row.key] = f"{type(e).__name__}: {e}"
      save()
      continue
    table["failed"].pop(row.key, None)
    wps = [table["models"][m].get("train_wps") for m in row.models]
    rec.update(label=row.label, models=list(row.models), beam_size=row.beam_size,
               paper_bleu=row.paper_bleu,
               train_wps=wps[0] if len(wps) == 1 else None)
    table["rows"][row.key] = _jsonable(rec)
    logging.info("%s: BLEU %.2f, tokenized %.2f, test ppl %.3f", row.label, rec["bleu"],
                 rec["bleu_tok"], rec["test_ppl"])
    save()
  return table


# --------------------------------------------------------------------------------------------
# The table and the findings.

def _fmt(x: Any, spec: str) -> str:
  return "" if x is None else format(x, spec)


def scale(cfg: Config) -> str:
  m, d, t = cfg.model, cfg.data, cfg.train
  length = f"{t.num_steps} steps" if t.num_steps else f"{t.num_epochs:g} epochs"
  corpus = (f"embedded corpus, {d.synthetic_train:,} training pairs" if d.source == "synthetic"
            else f"{d.source} corpus {d.tfds_name if d.source == 'tfds' else d.path}")
  return (f"{m.num_layers} layers x {m.hidden_size} cells, {m.embed_size}-d embeddings, "
          f"vocabularies {d.src_vocab_size:,}/{d.tgt_vocab_size:,}; {corpus}; "
          f"batch {t.batch_size}, {length}, {cfg.optim.name} lr {cfg.optim.learning_rate:g} "
          f"({cfg.optim.schedule} schedule)")


def findings(table: dict[str, Any], rows: Sequence[Row]) -> list[str]:
  """The paper's four claims checked against the measured rows ('pending' until measured)."""
  got = lambda r: table["rows"].get(r.key)
  verdict = lambda ok: "**reproduced**" if ok else "**not reproduced**"
  one = lambda group: next(r for r in rows if r.group == group)
  base, fwd = one("base"), one("forward")
  out = []

  a, b = got(fwd), got(base)
  if a and b:
    out.append(f"Reversed beats forward (paper: test ppl 5.8 -> 4.7, BLEU 25.9 -> 30.6): test ppl "
               f"{a['test_ppl']:.3f} -> {b['test_ppl']:.3f}, "
               f"BLEU {a['bleu']:.2f} -> {b['bleu']:.2f} "
               f"(tokenized {a['bleu_tok']:.2f} -> {b['bleu_tok']:.2f}): perplexity "
               f"{verdict(b['test_ppl'] < a['test_ppl'])}, BLEU {verdict(b['bleu'] > a['bleu'])}")
  else:
    out.append("Reversed vs forward: pending")

  depth_rows = sorted([base] + [r for r in rows if r.group == "depth"], key=lambda r: r.layers)
  vals = [(r.layers, got(r)) for r in depth_rows]
  if all(v for _, v in vals):
    ppl = [v["test_ppl"] for _, v in vals]
    bleu = [v["bleu"] for _, v in vals]
    steps = range(len(vals) - 1)
    change = ", ".join(f"{vals[i][0]}->{vals[i + 1][0]} layers "
                       f"{100 * (ppl[i + 1] / ppl[i] - 1):+.1f}%" for i in steps)
    out.append("Deeper beats shallower (paper: each extra layer ~10% lower perplexity): test ppl "
               + ", ".join(f"{d} layer{'s' if d > 1 else ''} {p:.3f}"
                           for (d, _), p in zip(vals, ppl))
               + f" ({change}); BLEU " + ", ".join(f"{x:.2f}" for x in bleu)
               + f": perplexity {verdict(all(ppl[i + 1] < ppl[i] for i in steps))}, "
               f"BLEU {verdict(all(bleu[i + 1] > bleu[i] for i in steps))}")
    short = [v.get("in_length_ppl") for _, v in vals]
    if all(x is not None for x in short):
      cfg = config_lib.from_dict(table["config"])
      out[-1] += (f". On the {vals[0][1].get('in_length_sentences')} test pairs within the "
                 f"training length (<= {cfg.data.max_len} tokens a side): test ppl "
                 + ", ".join(f"{d} layer{'s' if d > 1 else ''} {p:.3f}"
                             for (d, _), p in zip(vals, short))
                 + " (" + ", ".join(f"{vals[i][0]}->{vals[i + 1][0]} layers "
                                    f"{100 * (short[i + 1] / short[i] - 1):+.1f}%" for i in steps)
                 + f"): {verdict(all(short[i + 1] < short[i] for i in steps))}")
  else:
    out.append("Depth: pending")

  beams = {r.beam_size: got(r) for r in rows if r.models == base.models}
  if all(beams.values()):
    out.append(f"Beam {BIG_BEAM} not worse than beam 1 (paper: 1 works well, 2 gives most of the "
               "benefit): BLEU "
               + ", ".join(f"beam {k} {beams[k]['bleu']:.2f}" for k in sorted(beams))
               + f": {verdict(beams[BIG_BEAM]['bleu'] >= beams[1]['bleu'])}")
  else:
    out.append("Beam size: pending")

  ens = next(r for r in rows if r.group == "ensemble" and len(r.models) == max(ENSEMBLE_SIZES)
             and r.beam_size == BIG_BEAM)
  members = [r for r in rows if r.group in ("base", "member")]
  if got(ens) and all(got(r) for r in members):
    e = got(ens)
    best_bleu = max(got(r)["bleu"] for r in members)
    best_ppl = min(got(r)["test_ppl"] for r in members)
    out.append(f"Ensemble of {len(ens.models)} (beam {BIG_BEAM}) not worse than its best member: "
               f"BLEU {e['bleu']:.2f} vs best {best_bleu:.2f} (members "
               + ", ".join(f"{got(r)['bleu']:.2f}" for r in members)
               + f"), test ppl {e['test_ppl']:.3f} vs best {best_ppl:.3f}: BLEU "
               f"{verdict(e['bleu'] >= best_bleu)}, "
               f"perplexity {verdict(e['test_ppl'] <= best_ppl)}")
  else:
    out.append("Ensemble: pending")
  return out


def markdown(table: dict[str, Any], rows: Sequence[Row]) -> str:
  cfg = config_lib.from_dict(table["config"])
  lines = [f"# Table 1 at this scale ({table.get('base', 'custom')})", "",
           f"Scale: {scale(cfg)}.", ""]
  done = [table["rows"][r.key] for r in rows if r.key in table["rows"]]
  if done:
    lines += [f"Test: {table['split']} split, {done[0].get('sentences', '?')} sentences. "
              f"BLEU = sacreBLEU ({done[0].get('signature', '')}); tokenized BLEU = the paper's "
              "multi-bleu style on tokenized text. Words/s: source + target words per second, "
              "training (the model's median) and decoding (one batch, after compilation).", ""]
  limit = cfg.data.max_len
  if limit > 0:
    short = next((x["in_length_sentences"] for x in done if x.get("in_length_sentences")), "?")
    lines += [f"Test ppl within training length: on the {short} test pairs with at most {limit} "
              f"tokens a side (data.max_len), the lengths training kept; each other test pair has "
              "a side longer than any training sentence.", ""]
  in_len = f" test ppl, <= {limit} tokens |" if limit > 0 else ""
  lines += [f"| Method | BLEU | tokenized BLEU | test ppl |{in_len} train words/s | decode words/s "
            "| paper BLEU |",
            "|---|---:|---:|---:|" + ("---:|" if in_len else "") + "---:|---:|---:|"]
  for r in rows:
    rec = table["rows"].get(r.key)
    paper = _fmt(r.paper_bleu, ".2f")
    if rec is None:
      state = "failed (rerun)" if r.key in table.get("failed", {}) else "pending"
      if table.get("only") and r.group not in table["only"]:
        state = "not run (--only)"
      lines.append(f"| {r.label} | {state} | | |{' |' if in_len else ''} | | {paper} |")
      continue
    short_ppl = f" {_fmt(rec.get('in_length_ppl'), '.3f')} |" if in_len else ""
    lines.append(f"| {r.label} | {rec['bleu']:.2f} | {rec['bleu_tok']:.2f} | "
                 f"{rec['test_ppl']:.3f} |"
                 f"{short_ppl} {_fmt(rec.get('train_wps'), ',.0f')} | "
                 f"{_fmt(rec.get('decode_wps'), ',.0f')} | {paper} |")
  lines += ["", "Findings (measured):", ""] + [f"- {f}" for f in findings(table, rows)]
  return "\n".join(lines + models_table(table.get("models", {}))) + "\n"


def models_table(trained: dict[str, Any]) -> list[str]:
  """Markdown lines of the trained models' table (none when there are none)."""
  if not trained:
    return []
  lines = ["", "| Model | steps | valid ppl | train words/s | training s (last run) |",
           "|---|---:|---:|---:|---:|"]
  for name, rec in trained.items():
    lines.append(f"| {name} | {rec.get('step')} | {_fmt(rec.get('valid_ppl'), '.3f')} | "
                 f"{_fmt(rec.get('train_wps'), ',.0f')} | "
                 f"{_fmt(rec.get('seconds_this_run'), '.0f')} |")
  return lines


def exit_status(table: dict[str, Any]) -> int:
  """A runner's exit status: 1 (saying so) when rows failed, 130 when interrupted, else 0."""
  if table["failed"]:
    print(f"error: {len(table['failed'])} row(s) failed to evaluate (see the log); rerun the same "
          "command to retry them", file=sys.stderr)
    return 1
  return 130 if table["interrupted"] else 0


def _main(argv: Sequence[str] | None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  updates, extras = config_lib.parse_args(argv, extra_flags=("workdir", "base", "split",
                                                              "max_sentences", "only"))
  if "workdir" not in extras:
    raise ConfigError("--workdir DIR is required")
  base_name = extras.get("base", "quickstart")
  base = config_lib.override(load_base(base_name), updates)
  max_sentences = int(extras.get("max_sentences", 0))
  only = [g for g in extras.get("only", "").split(",") if g]
  table = run(base, extras["workdir"], split=extras.get("split", "test"),
              max_sentences=max_sentences, only=only,
              meta={"base": base_name, "overrides": updates})
  _, rows = plan(base)
  print(markdown(table, rows))
  return exit_status(table)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
