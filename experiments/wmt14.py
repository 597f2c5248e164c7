"""The paper exactly: WMT'14 English->French, 4x1000 LSTMs, 160k/80k vocabularies, SGD 0.7.

    python -m experiments.wmt14 --workdir runs/wmt14
"""

import sys

from s2s_jax import config as c
from s2s_jax import train


def config() -> c.Config:
  return c.Config(
      model=c.ModelConfig(num_layers=4, hidden_size=1000, embed_size=1000, init_scale=0.08),
      data=c.DataConfig(source="tfds", tfds_name="wmt14_translate/fr-en", src_lang="en",
                        tgt_lang="fr", reverse_source=True, src_vocab_size=160_000,
                        tgt_vocab_size=80_000, tokenizer="moses", max_len=50,
                        max_eval_sentences=0),
      optim=c.OptimConfig(name="sgd", learning_rate=0.7, clip_norm=5.0, schedule="paper",
                          decay_start_epoch=5.0, decay_every_epochs=0.5, decay_factor=0.5),
      train=c.TrainConfig(batch_size=128, num_epochs=7.5, num_steps=0, eval_every=2000,
                          checkpoint_every=2000, log_every=100),
      decode=c.DecodeConfig(beam_size=12, length_penalty=0.0),
  )


if __name__ == "__main__":
  sys.exit(train.main(config(), sys.argv[1:]))
