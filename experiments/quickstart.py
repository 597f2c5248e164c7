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
  """Prints a few translations of test sentences."""
  from s2s_jax import checkpoint, decode
  from s2s_jax.data import pipeline, sources, tokenize
  import numpy as np

  _, params, src_vocab, tgt_vocab, _ = checkpoint.load_model(workdir)
  pairs = sources.load_pairs(cfg.data)["test"][:5]
  tok = tokenize.tokenizer(cfg.data.tokenizer, cfg.data.src_lang)
  detok = tokenize.detokenizer(cfg.data.tokenizer, cfg.data.tgt_lang)
  ids = [pipeline.encode_source(tok(s), src_vocab, cfg.data.reverse_source) for s, _ in pairs]
  length = max(len(x) for x in ids)
  src = np.zeros((len(ids), length), np.int32)
  for i, x in enumerate(ids):
    src[i, :len(x)] = x
  out, _ = decode.greedy(params, src, cfg=cfg.model, max_len=int(1.5 * length) + 10)
  for (s, r), row in zip(pairs, np.asarray(out)):
    print(f"source: {s}\nmodel:  {detok(tgt_vocab.decode(row))}\nref:    {r}\n")


if __name__ == "__main__":
  sys.exit(train.main(config(), sys.argv[1:], after=show_results))
