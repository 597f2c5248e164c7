"""Luong, Pham and Manning (2015), Table 1, at any scale: the paper's model, then what came
right after it, one switch at a time, each trained and measured.

    python -m experiments.ladder --workdir DIR [--base quickstart|wmt14|<preset>]
        [--attention location|dot|general|concat|additive] [--dropout 0.2]
        [--split test] [--max_sentences N] [--only RUNG,...] [--section.field=value ...]

The overrides apply to the base preset (`experiments.<base>.config()`). Each rung is the one
before it with one more change:
  base             data.reverse_source=false, model.dropout=0, model.attention=none
  + reverse        data.reverse_source=true (the paper's trick)
  + dropout        model.dropout=0.2 (Zaremba et al.'s non-recurrent dropout at Luong's rate)
  + attention      model.attention=location: global attention with Luong's location-based
                   score, the type of their Table 1 row (--attention picks another)
  + input feeding  model.input_feeding=true
  + unk replace    the input-feeding model again, decoded with unknown-word replacement
                   (`translate --replace_unk`, no dictionary); nothing is trained for it
Luong et al. measured on WMT'14 English->German with 4 x 1000 LSTMs, 50k vocabularies, 10
epochs (12 with dropout): perplexity / BLEU 10.6 / 11.3, 9.9 / 12.6, 8.1 / 14.0, 7.3 /
16.8, 6.4 / 18.1. Their unk-replacement row (20.9, +1.9) replaced words in a model with local
attention (local-p, general score: 19.0), a rung this project does not have; here the
replacement is applied to the input-feeding model, so only its gain is comparable.

Every rung is decoded on the test split with the base's decode settings. Per row: test
perplexity, BLEU both ways (`s2s_jax.bleu`), the change in BLEU from the rung before, training
words/s, and Luong et al.'s figures beside them. Each model lives in DIR/models/<name>, so an
interrupted training resumes; the rows go to DIR/ladder.json as each completes and to
DIR/ladder.md (the table and the findings). A rerun skips finished work; another --attention
in the same DIR reuses the three lower rungs. A DIR keeps one base config and dropout rate.
--only base,reverse,dropout,attention,feed,unk runs just those rows (and trains only their
models; each rung's model is trained from scratch, so any subset works).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from experiments import ablations
from s2s_jax import cli
from s2s_jax import config as config_lib
from s2s_jax.config import Config, ConfigError

LADDER_JSON = "ladder.json"
LADDER_MD = "ladder.md"
DROPOUT = 0.2  # Luong et al.'s rate
ATTENTION = "location"  # the score of Luong et al.'s Table 1 attention rows
SCORES = ("location", "dot", "general", "concat", "additive")
RUNGS = ("base", "reverse", "dropout", "attention", "feed", "unk")  # names for --only

TrainFn = Callable[[Config, str], dict[str, Any]]  # (config, WORKDIR) -> train.train's result
EvalFn = Callable[[str, bool, str, int], dict[str, Any]]  # (WORKDIR, replace_unk, split, max)


@dataclasses.dataclass(frozen=True)
class Rung:
  key: str  # the row's id in ladder.json; its name (--only) is the part before any "-"
  label: str
  model: str  # its WORKDIR under DIR/models
  overrides: dict  # of the base config
  replace_unk: bool  # decoded with unknown-word replacement
  luong_ppl: float | None  # Luong et al.'s Table 1 figures for the row
  luong_bleu: float


def plan(attention: str = ATTENTION, dropout: float = DROPOUT) -> list[Rung]:
  """The rungs, bottom first (see the module doc)."""
  if attention not in SCORES:
    raise ConfigError(f"--attention must be one of {', '.join(SCORES)}, got {attention!r}")
  steps = [("base", "Base (source in order)", {"data.reverse_source": False, "model.dropout": 0.0,
                                                "model.attention": "none",
                                                "model.input_feeding": False}, 10.6, 11.3),
           ("reverse", "+ reverse", {"data.reverse_source": True}, 9.9, 12.6),
           ("dropout", f"+ dropout {dropout:g}", {"model.dropout": dropout}, 8.1, 14.0),
           (f"attention-{attention}", f"+ global attention ({attention})",
            {"model.attention": attention}, 7.3, 16.8),
           (f"feed-{attention}", "+ input feeding", {"model.input_feeding": True}, 6.4, 18.1)]
  rungs, overrides = [], {}
  for key, label, changes, ppl, bleu in steps:
    overrides = {**overrides, **changes}
    rungs.append(Rung(key, label, key, overrides, False, ppl, bleu))
  top = rungs[-1]
  return rungs + [Rung(f"unk-{attention}", "+ unknown-word replacement", top.model,
                       top.overrides, True, None, 20.9)]


def evaluate_rung(workdir: str, replace_unk: bool, split: str = "test",
                  max_sentences: int = 0) -> dict[str, Any]:
  """`ablations.evaluate_models` of one model at the beam size its config decodes with."""
  beam = config_lib.load_json(os.path.join(workdir, "config.json")).decode.beam_size
  return ablations.evaluate_models([workdir], beam, split, max_sentences, replace_unk)


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _open_table(path: str, base: Config, dropout: float) -> dict[str, Any]:
  """ladder.json, or a new table; a ConfigError when the DIR holds another config."""
  cfg_dict = json.loads(json.dumps(config_lib.to_dict(base), sort_keys=True))
  if not os.path.exists(path):
    return {"config": cfg_dict, "dropout": dropout, "models": {}, "rows": {}}
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); move it away to "
                      "start the ladder again") from None
  if table.get("config") != cfg_dict or table.get("dropout") != dropout:
    changed = config_lib.diff(config_lib.from_dict(table.get("config", {})), base)
    if table.get("dropout") != dropout:
      changed.append(f"--dropout: {table.get('dropout')} -> {dropout}")
    raise ConfigError(f"{path}: this DIR holds a ladder made with another config ("
                      f"{'; '.join(changed) or 'unreadable'}); rerun with the same base and "
                      "overrides, or use a new --workdir")
  return table


def run(base: Config, workdir: str, *, attention: str = ATTENTION, dropout: float = DROPOUT,
        train_fn: TrainFn = ablations.train_model, evaluate_fn: EvalFn = evaluate_rung,
        split: str = "test", max_sentences: int = 0, only: Sequence[str] = (),
        meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains what is missing, evaluates the rows not yet done, writes the table after each row.
  Returns the table's JSON data; stops early ("interrupted": true) when a training was
  interrupted by a signal. A row whose evaluation raises is logged, left out ("failed") and
  retried by the next run. `only`: the rung names to run (empty: all)."""
  unknown = sorted(set(only) - set(RUNGS))
  if unknown:
    raise ConfigError(f"--only: unknown rung(s) {', '.join(unknown)}; rungs: {', '.join(RUNGS)}")
  rungs = plan(attention, dropout)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LADDER_JSON)
  table = _open_table(path, base, dropout)
  table.update({"split": split, "max_sentences": max_sentences, "attention": attention,
                **(meta or {})})
  table["interrupted"] = False
  table["failed"] = {}

  def save():
    _write(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
    _write(os.path.join(workdir, LADDER_MD), markdown(table, rungs))

  save()
  for rung in rungs:
    if only and rung.key.split("-")[0] not in only:
      continue
    if rung.key in table["rows"]:
      logging.info("row done already: %s", rung.label)
      continue
    sub = os.path.join(workdir, ablations.MODELS_DIR, rung.model)
    if rung.model not in table["models"]:
      logging.info("training %s in %s", rung.model, sub)
      start = time.perf_counter()
      result = train_fn(config_lib.override(base, rung.overrides), sub)
      if result.get("interrupted"):
        logging.warning("training %s interrupted; rerun the same command to resume", rung.model)
        table["interrupted"] = True
        save()
        return table
      table["models"][rung.model] = {
          "workdir": sub, "overrides": rung.overrides, "step": result.get("step"),
          "valid_ppl": result.get("valid_ppl"), "seconds_this_run": time.perf_counter() - start,
          "train_wps": ablations.median_train_wps(sub)}
      save()
    logging.info("evaluating: %s", rung.label)
    try:
      rec = dict(evaluate_fn(sub, rung.replace_unk, split, max_sentences))
    except Exception as e:  # keep climbing; a rerun retries this row
      logging.exception("evaluating %s failed; continuing (a rerun retries it)", rung.label)
      table["failed"][rung.key] = f"{type(e).__name__}: {e}"
      save()
      continue
    rec.update(label=rung.label, model=rung.model, replace_unk=rung.replace_unk,
               train_wps=table["models"][rung.model].get("train_wps"))
    table["rows"][rung.key] = json.loads(json.dumps(rec, sort_keys=True))
    logging.info("%s: BLEU %.2f, tokenized %.2f, test ppl %.3f", rung.label, rec["bleu"],
                 rec["bleu_tok"], rec["test_ppl"])
    save()
  return table


# --------------------------------------------------------------------------------------------
# The table and the findings.

def _fmt(x: Any, spec: str, sign: bool = False) -> str:
  return "" if x is None else format(x, ("+" if sign else "") + spec)


def findings(table: dict[str, Any], rungs: Sequence[Rung]) -> list[str]:
  """Did each rung help as it did for Luong et al.? ('pending' until both rows are measured)."""
  out = []
  verdict = lambda ok: "**reproduced**" if ok else "**not reproduced**"
  for below, rung in zip(rungs, rungs[1:]):
    a, b = table["rows"].get(below.key), table["rows"].get(rung.key)
    if not (a and b):
      out.append(f"{rung.label}: pending")
      continue
    luong_gain = rung.luong_bleu - (19.0 if rung.replace_unk else below.luong_bleu)
    text = (f"{rung.label}: BLEU {a['bleu']:.2f} -> {b['bleu']:.2f} ({b['bleu'] - a['bleu']:+.2f}; "
            f"tokenized {b['bleu_tok'] - a['bleu_tok']:+.2f}; Luong et al. {luong_gain:+.1f}): "
            f"{verdict(b['bleu'] > a['bleu'])}")
    if not rung.replace_unk:
      text += (f"; test ppl {a['test_ppl']:.3f} -> {b['test_ppl']:.3f} (Luong et al. "
               f"{below.luong_ppl} -> {rung.luong_ppl}): {verdict(b['test_ppl'] < a['test_ppl'])}")
    out.append(text)
  return out


def markdown(table: dict[str, Any], rungs: Sequence[Rung]) -> str:
  cfg = config_lib.from_dict(table["config"])
  lines = [f"# Luong et al. (2015) Table 1 at this scale ({table.get('base', 'custom')})", "",
           f"Scale: {ablations.scale(cfg)}; dropout {table.get('dropout')}, decoded with beam "
           f"{cfg.decode.beam_size}.", ""]
  done = [table["rows"][r.key] for r in rungs if r.key in table["rows"]]
  if done:
    lines += [f"Test: {table['split']} split, {done[0].get('sentences', '?')} sentences. BLEU = "
              f"sacreBLEU ({done[0].get('signature', '')}); tokenized BLEU = multi-bleu style on "
              "tokenized text. Luong et al.: WMT'14 English->German, 4 x 1000 LSTMs; their "
              "unk-replacement gain (+1.9) was measured on a local-attention model (19.0 -> 20.9). "
              "sacreBLEU's tokenizer splits an output `<unk>` into three tokens (`< unk >`), so "
              "replacing it raises sacreBLEU even where the copied word is wrong; the tokenized "
              "BLEU counts it as one token and shows the gain of the copied words alone.", ""]
  lines += ["| Rung | test ppl | BLEU | tokenized BLEU | BLEU change | train words/s | "
            "Luong ppl | Luong BLEU |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  previous = None
  for r in rungs:
    rec = table["rows"].get(r.key)
    luong = f"{_fmt(r.luong_ppl, '.1f')} | {r.luong_bleu:.1f} |"
    if rec is None:
      state = "failed (rerun)" if r.key in table.get("failed", {}) else "pending"
      lines.append(f"| {r.label} | {state} | | | | | {luong}")
      previous = None
      continue
    change = None if previous is None else rec["bleu"] - previous
    ppl = "" if r.replace_unk else f"{rec['test_ppl']:.3f}"
    lines.append(f"| {r.label} | {ppl} | {rec['bleu']:.2f} | {rec['bleu_tok']:.2f} | "
                 f"{_fmt(change, '.2f', sign=True)} | {_fmt(rec.get('train_wps'), ',.0f')} | "
                 f"{luong}")
    previous = rec["bleu"]
  lines += ["", "Findings (measured):", ""] + [f"- {f}" for f in findings(table, rungs)]
  models = table.get("models", {})
  trained = {r.model: models[r.model] for r in rungs if r.model in models}  # in rung order
  return "\n".join(lines + ablations.models_table(trained)) + "\n"


def _main(argv: Sequence[str] | None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  updates, extras = config_lib.parse_args(argv, extra_flags=(
      "workdir", "base", "attention", "dropout", "split", "max_sentences", "only"))
  if "workdir" not in extras:
    raise ConfigError("--workdir DIR is required")
  base_name = extras.get("base", "quickstart")
  base = config_lib.override(ablations.load_base(base_name), updates)
  attention = extras.get("attention", ATTENTION)
  try:
    dropout = float(extras.get("dropout", DROPOUT))
  except ValueError:
    raise ConfigError(f"--dropout must be a number, got {extras['dropout']!r}") from None
  table = run(base, extras["workdir"], attention=attention, dropout=dropout,
              split=extras.get("split", "test"), max_sentences=int(extras.get("max_sentences", 0)),
              only=[r for r in extras.get("only", "").split(",") if r],
              meta={"base": base_name, "overrides": updates})
  print(markdown(table, plan(attention, dropout)))
  return ablations.exit_status(table)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
