"""A small model on the embedded English->French corpus: the whole pipeline in minutes on a CPU.

    python -m experiments.quickstart --workdir runs/quickstart
"""

import sys

from s2s_jax import config as c
from s2s_jax import train


def config() -> c.Config:
  return c.Config(
      model=c.ModelConfig(num_layers=2, hidden_size=256, embed_size=128, init_scale=0.08),
      data=c.DataConfig(source="synthetic", reverse_source=True, src_vocab_size=2000,
                        tgt_vocab_size=2000, tokenizer="moses", max_len=40,
                        synthetic_train=20_000, synthetic_valid=500, synthetic_test=500),
      optim=c.OptimConfig(name="sgd", learning_rate=0.7, clip_norm=5.0, schedule="paper",
                          decay_start_epoch=5.0, decay_every_epochs=0.5),
      train=c.TrainConfig(batch_size=64, num_epochs=7.5, eval_every=500, checkpoint_every=500,
                          log_every=50),
      decode=c.DecodeConfig(beam_size=4, batch_size=64),
  )


def show_results(cfg: c.Config, workdir: str) -> None:
  """Prints a few beam-search translations of test sentences and the test BLEU."""
  from s2s_jax import evaluate, translate
  from s2s_jax.data import sources

  m = translate.load([workdir])
  pairs = sources.load_pairs(m.cfg.data)["test"]
  results, hyps = evaluate.evaluate(m, pairs, "test")
  detok = translate.detokenizer(m)
  for (s, r), h in list(zip(pairs, hyps))[:4]:
    print(f"source: {s}\nmodel:  {detok(h)}\nref:    {r}\n")
  path = evaluate.save_results(results, workdir)
  print(f"test BLEU {results['bleu']:.2f} ({results['signature']}); tokenized BLEU "
        f"{results['bleu_tok']:.2f}; perplexity {results['perplexity']:.3f}; beam "
        f"{m.cfg.decode.beam_size}; saved to {path}")


if __name__ == "__main__":
  sys.exit(train.main(config(), sys.argv[1:], after=show_results))
