"""The paper's analyses as command-line tools on a trained WORKDIR.

    python -m s2s_jax.analysis.pca --workdir DIR            # Figure 2: PCA of encoder states
    python -m s2s_jax.analysis.by_length --workdir DIR      # Figure 3: BLEU by length and rarity
    python -m s2s_jax.analysis.long_examples --workdir DIR  # Table 3: the longest test sentences
    python -m s2s_jax.analysis.curves --workdir DIR [DIR2 ...]  # training curves, runs overlaid
    python -m s2s_jax.analysis.attention --workdir DIR --sentence "..."  # an attention matrix

Each writes its figure or table plus a JSON file with the numbers (into the WORKDIR, or --out).
"""
