"""Figure 2: the encoder's representation of phrases, projected to 2-D with PCA.

    python -m s2s_jax.analysis.pca --workdir DIR [--phrases FILE] [--state all|top|top_h]
        [--out DIR]

The representation of a phrase is the encoder's final state after reading it (reversed when
the model was trained reversed). `--state` picks which part:
  all    h and c of every layer, concatenated (2 * layers * hidden numbers): the vector v that
         initialises the decoder, the paper's "fixed-dimensional representation" (default);
  top    h and c of the top layer;
  top_h  h of the top layer only.
PCA: the states are centred and projected on the two leading right singular vectors (numpy
SVD); each component's sign is fixed so that its largest-magnitude loading is positive, so the
picture is deterministic.

Default phrases: `s2s_jax.data.synthetic.analysis_phrases()`: groups of four clauses, each
phrase with a `kind`: "base" (active, "John admires Mary"), "voice" (its passive, same
meaning: "Mary is admired by John"), "order" (agent and patient swapped, another meaning with
the same words: "Mary admires John") and "order_voice" (the passive of that). Two phrases of
one group form a voice pair when they differ only in voice, an order pair when they differ
only in who does what, an order+voice pair when they differ in both. The paper's finding is
that the representation is sensitive to word order and fairly invariant to voice: the mean
distance within voice pairs should be smaller than within order pairs. Both are printed and
saved (in the full state space and in the 2-D projection) with two scales: the mean distance
over all phrase pairs and over pairs from different groups.

--phrases FILE: a JSON list of objects {"<src_lang>" or "text": phrase, "group", "kind"}, or a
text file with one phrase a line, optionally as `group<TAB>kind<TAB>phrase`; kinds as above
(a phrase without group or kind is drawn but in no pair).
Writes pca.png and pca.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from s2s_jax import cli, model, translate
from s2s_jax.analysis import common
from s2s_jax.config import ModelConfig
from s2s_jax.data import sources, synthetic
from s2s_jax.data.vocab import PAD_ID

STATES = ("all", "top", "top_h")
Phrase = dict[str, str]  # {"text", "group", "kind"}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode(params: model.Params, src_BxS: jax.Array, *, cfg: ModelConfig):
  return model.encode(params, src_BxS, cfg)


def encoder_states(m: translate.Loaded, phrases: Sequence[str], state: str = "all") -> np.ndarray:
  """The encoder's final state for every phrase, NxD (see the module docstring for `state`)."""
  if state not in STATES:
    raise ValueError(f"--state must be one of {', '.join(STATES)}, got {state!r}")
  ids = translate.encode_sources(m, phrases, "phrases")
  for n, (text, x) in enumerate(zip(phrases, ids), 1):
    if not x:
      raise ValueError(f"phrases: phrase {n} ({text!r}) has no tokens")
  src_BxS = np.full((len(ids), max(len(x) for x in ids)), PAD_ID, np.int32)
  for i, x in enumerate(ids):
    src_BxS[i, :len(x)] = x
  st = jax.device_get(_encode(m.params, src_BxS, cfg=m.cfg.model))
  h_LxBxH, c_LxBxH = np.asarray(st.h_LxBxH), np.asarray(st.c_LxBxH)
  if state == "top_h":
    return h_LxBxH[-1]
  if state == "top":
    return np.concatenate([h_LxBxH[-1], c_LxBxH[-1]], axis=1)
  parts = [p for layer in range(h_LxBxH.shape[0]) for p in (h_LxBxH[layer], c_LxBxH[layer])]
  return np.concatenate(parts, axis=1)


def pca_2d(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(projection Nx2, components 2xD, explained-variance ratio of each, 2)."""
  x_NxD = np.asarray(x_NxD, np.float64)
  if x_NxD.shape[0] < 2:
    raise ValueError("PCA needs at least 2 phrases")
  centred = x_NxD - x_NxD.mean(axis=0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  comps_KxD = vt[:2]
  if comps_KxD.shape[0] < 2:  # a single feature: pad with a zero component
    comps_KxD = np.concatenate([comps_KxD, np.zeros((2 - comps_KxD.shape[0], x_NxD.shape[1]))])
    s = np.concatenate([s, np.zeros(2)])
  big = np.argmax(np.abs(comps_KxD), axis=1)
  signs = np.sign(comps_KxD[np.arange(2), big])
  comps_KxD = comps_KxD * np.where(signs == 0, 1.0, signs)[:, None]
  total = float(np.sum(s ** 2))
  ratio = (s[:2] ** 2) / total if total > 0 else np.zeros(2)
  return centred @ comps_KxD.T, comps_KxD, ratio


# kind -> (agent and patient swapped, passive voice)
KINDS = {"base": (False, False), "voice": (False, True), "order": (True, False),
         "order_voice": (True, True)}


def pair_kind(a: Phrase, b: Phrase) -> str | None:
  """'voice', 'order' or 'order+voice' for two phrases of one group; None if not a pair."""
  if not a["group"] or a["group"] != b["group"] or not a["kind"] or not b["kind"]:
    return None
  for p in (a, b):
    if p["kind"] not in KINDS:
      raise ValueError(f"phrase {p['text']!r}: kind must be one of {', '.join(KINDS)}, "
                       f"got {p['kind']!r}")
  (sa, pa), (sb, pb) = KINDS[a["kind"]], KINDS[b["kind"]]
  if sa != sb and pa != pb:
    return "order+voice"
  if sa != sb:
    return "order"
  return "voice" if pa != pb else None


def pair_distances(x_NxD: np.ndarray, phrases: Sequence[Phrase]) -> dict[str, Any]:
  """Mean Euclidean distance within the pairs of each kind (see `pair_kind`) and two scales.

  Returns {"<pair kind>": {"mean", "count"}, ..., "other_groups": pairs from different groups,
  "all_pairs": every pair of phrases}.
  """
  x_NxD = np.asarray(x_NxD, np.float64)
  found: dict[str, list[float]] = {}
  for i, j in itertools.combinations(range(len(phrases)), 2):
    d = float(np.linalg.norm(x_NxD[i] - x_NxD[j]))
    kind = pair_kind(phrases[i], phrases[j])
    if kind:
      found.setdefault(kind, []).append(d)
    elif phrases[i]["group"] != phrases[j]["group"]:
      found.setdefault("other_groups", []).append(d)
    found.setdefault("all_pairs", []).append(d)
  return {k: {"mean": float(np.mean(v)), "count": len(v)} for k, v in sorted(found.items())}


def load_phrases(path: str | None, src_lang: str) -> list[Phrase]:
  """Phrases from --phrases FILE (see the module docstring) or the embedded grammar's set."""
  if path is None:
    raw = synthetic.analysis_phrases()
    return [{"text": p[src_lang] if src_lang in p else p["en"], "group": str(p.get("group", "")),
             "kind": str(p.get("kind", ""))} for p in raw]
  if path.endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except FileNotFoundError:
      raise ValueError(f"{path}: file not found") from None
    if not isinstance(raw, list):
      raise ValueError(f"{path}: expected a JSON list of phrase objects")
    out = []
    for n, p in enumerate(raw, 1):
      text = p.get(src_lang, p.get("text")) if isinstance(p, dict) else None
      if not isinstance(text, str):
        raise ValueError(f"{path}: entry {n}: needs a string field '{src_lang}' or 'text'")
      out.append({"text": text, "group": str(p.get("group", "")), "kind": str(p.get("kind", ""))})
    return out
  out = []
  for n, line in enumerate(sources.read_lines(path), 1):
    if not line:
      continue
    fields = line.split("\t")
    if len(fields) == 1:
      out.append({"text": fields[0], "group": "", "kind": ""})
    elif len(fields) == 3:
      out.append({"text": fields[2], "group": fields[0], "kind": fields[1]})
    else:
      raise ValueError(f"{path}: line {n}: expected a phrase or group<TAB>kind<TAB>phrase, "
                       f"got {len(fields)} tab-separated fields")
  return out


def plot(y_Nx2: np.ndarray, phrases: Sequence[Phrase], path: str, title: str) -> None:
  """Scatter with every point labelled; voice pairs and order pairs joined by lines."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(12, 10))
  styles = {"voice": ("tab:blue", "-"), "order": ("tab:red", "--")}
  drawn = set()
  for i, j in itertools.combinations(range(len(phrases)), 2):
    kind = pair_kind(phrases[i], phrases[j])
    if kind in styles:
      colour, line = styles[kind]
      ax.plot(y_Nx2[[i, j], 0], y_Nx2[[i, j], 1], line, color=colour, alpha=0.5, lw=1,
              label=None if kind in drawn else f"{kind} pair")
      drawn.add(kind)
  ax.scatter(y_Nx2[:, 0], y_Nx2[:, 1], s=14, color="black", zorder=3)
  for (x, y), p in zip(y_Nx2, phrases):
    ax.annotate(p["text"], (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6.5)
  if drawn:
    ax.legend(loc="best")
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def analyse(m: translate.Loaded, phrases: Sequence[Phrase], state: str = "all") -> dict[str, Any]:
  """States, 2-D projection and distances of `phrases` as one JSON-able dict."""
  x_NxD = encoder_states(m, [p["text"] for p in phrases], state)
  y_Nx2, _, ratio = pca_2d(x_NxD)
  distances = {"full": pair_distances(x_NxD, phrases), "pca_2d": pair_distances(y_Nx2, phrases)}
  ratio_vo = {space: d["voice"]["mean"] / d["order"]["mean"]
              for space, d in distances.items()
              if "voice" in d and d.get("order", {}).get("mean", 0) > 0}
  return {"state": state, "state_size": int(x_NxD.shape[1]),
          "explained_variance_ratio": [float(r) for r in ratio],
          "points": [{**p, "x": float(x), "y": float(y)} for p, (x, y) in zip(phrases, y_Nx2)],
          "distances": distances, "voice_over_order": ratio_vo}


def write_figure(m: translate.Loaded, workdir: str, phrases: Sequence[Phrase], state: str,
                 folder: str) -> dict[str, Any]:
  """`analyse`, then pca.png and pca.json in `folder`; returns the result."""
  step = m.steps[0]
  result = analyse(m, phrases, state)
  result.update(workdir=workdir, step=step)
  png = os.path.join(folder, "pca.png")
  plot(np.array([[p["x"], p["y"]] for p in result["points"]]), phrases, png,
       f"Encoder states ({state}), {os.path.basename(os.path.normpath(workdir))} step {step}")
  common.write_json(os.path.join(folder, "pca.json"), result)
  logging.info("wrote %s and %s", png, os.path.join(folder, "pca.json"))
  return result


def summary(result: dict[str, Any]) -> str:
  lines = [f"state: {result['state']} ({result['state_size']} numbers); PCA explains "
           f"{100 * sum(result['explained_variance_ratio']):.1f}% of the variance"]
  for space, d in result["distances"].items():
    parts = [f"{k} {v['mean']:.4f} (n={v['count']})" for k, v in d.items()]
    lines.append(f"mean distance, {space}: " + ", ".join(parts))
  for space, r in result["voice_over_order"].items():
    lines.append(f"{space}: voice pairs are {r:.2f}x as far apart as order pairs "
                 f"({'closer' if r < 1 else 'not closer'}; the paper: closer)")
  return "\n".join(lines)


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s2s_jax.analysis.pca",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training WORKDIR")
  parser.add_argument("--phrases", help="phrase file (default: the embedded grammar's phrases)")
  parser.add_argument("--state", default="all", choices=STATES,
                      help="which encoder state to project")
  parser.add_argument("--out", help="folder for pca.png and pca.json (default: the WORKDIR)")
  args = parser.parse_args(argv)
  m = translate.load([args.workdir])
  phrases = load_phrases(args.phrases, m.cfg.data.src_lang)
  result = write_figure(m, args.workdir, phrases, args.state, common.out_dir(args))
  print(summary(result))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
