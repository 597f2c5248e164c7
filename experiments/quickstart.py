"""A small model on the embedded English->French corpus: the whole pipeline in minutes on a CPU.

    python -m experiments.quickstart --workdir runs/quickstart
"""

import os
import sys

from s2s_jax import config as c
from s2s_jax import evaluate, model, train, translate
from s2s_jax.analysis import curves, pca
from s2s_jax.data import sources


def config() -> c.Config:
  # Not the paper's recipe (that is experiments/wmt14.py): tuned to learn the embedded grammar in
  # a few CPU minutes. Measured on 2 cores: matmuls in bfloat16 where the CPU has
  # bf16 dot products (~1.7x faster than float32 on a Zen 4), else in float32 (1.45x faster than
  # bfloat16 on a Zen 1); Adam learns far faster than SGD 0.7 in 3k steps; 100k fresh pairs
  # overfit less than 20k seen 10 times; a final halving phase (the paper's schedule, compressed)
  # cut validation perplexity from ~4.0 to ~3.2.
  return c.Config(
      model=c.ModelConfig(num_layers=2, hidden_size=256, embed_size=128, init_scale=0.08,
                          compute_dtype="auto"),
      data=c.DataConfig(source="synthetic", reverse_source=True, src_vocab_size=2000,
                        tgt_vocab_size=2000, tokenizer="moses", max_len=25,
                        synthetic_train=100_000, synthetic_valid=500, synthetic_test=500),
      optim=c.OptimConfig(name="adam", learning_rate=3e-3, clip_norm=5.0, schedule="paper",
                          decay_start_epoch=1.5, decay_every_epochs=0.25),
      train=c.TrainConfig(batch_size=64, num_epochs=2.5, eval_every=1000, checkpoint_every=1000,
                          log_every=50),
      decode=c.DecodeConfig(beam_size=4, batch_size=64),
  )


def show_results(cfg: c.Config, workdir: str) -> None:
  """Prints beam-search translations of a few test sentences and the test BLEU, then draws the
  training curves (WORKDIR/curves.png) and the PCA of encoder states (WORKDIR/pca.png)."""
  m = translate.load([workdir])
  pairs = sources.read_split(m.cfg.data, "test")  # generates the test split alone
  results, hyps = evaluate.evaluate(m, pairs, "test")
  detok = translate.detokenizer(m)
  for (s, r), h in list(zip(pairs, hyps))[:4]:
    print(f"source: {s}\nmodel:  {detok(h)}\nref:    {r}\n")
  path = evaluate.save_results(results, workdir)
  print(f"test BLEU {results['bleu']:.2f} ({results['signature']}); tokenized BLEU "
        f"{results['bleu_tok']:.2f}; perplexity {results['perplexity']:.3f}; beam "
        f"{m.cfg.decode.beam_size}; saved to {path}")
  curves.curves([workdir], ["quickstart"], workdir)
  phrases = pca.load_phrases(None, m.cfg.data.src_lang)
  print(pca.summary(pca.write_figure(m, workdir, phrases, "all", workdir)))
  print(summary(m, results, workdir))


def summary(m, results: dict, workdir: str) -> str:
  """What a newcomer should take away: what was trained, how good it is, where to look next."""
  cfg = m.cfg
  data = (f"{cfg.data.synthetic_train:,} English->French sentence pairs of the embedded grammar"
          if cfg.data.source == "synthetic" else f"the {cfg.data.source} corpus")
  order = "read reversed" if cfg.data.reverse_source else "read in order"
  return "\n".join([
      "",
      "summary",
      f"  trained  a {cfg.model.num_layers}-layer LSTM encoder-decoder ({cfg.model.hidden_size} "
      f"cells a layer, {model.num_params(m.params) / 1e6:.1f}M parameters) for "
      f"{m.steps[0]:,} steps on {data}, source {order}",
      f"  quality  test BLEU {results['bleu']:.1f} on {results.get('sentences', 'the')} held-out "
      "sentences (0 = nothing right, 100 = the reference word for word; the paper's big model "
      "reached 34.8 on real news)",
      f"           perplexity {results['perplexity']:.2f}: at each word the model is about as "
      f"unsure as a choice among {results['perplexity']:.0f} equally likely words",
      f"  plots    {os.path.join(workdir, 'curves.png')} (loss and perplexity while training), "
      f"{os.path.join(workdir, 'pca.png')} (the paper's Figure 2)",
      f"  next     python -m s2s_jax.translate --workdir {workdir} < sentences.en; "
      "README: your own data, the paper's configuration",
  ])


if __name__ == "__main__":
  sys.exit(train.main(config(), sys.argv[1:], after=show_results))
