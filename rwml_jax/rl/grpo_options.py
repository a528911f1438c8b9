"""The GRPO loss's named choices (see `rwml_jax.rl.grpo`), importable without JAX (recipe validation)."""

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k3")
