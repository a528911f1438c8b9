"""The CPU demo's RWML step size x KL weight: 4 points that differ only in `rwml.*` keys, so warmstart,
collect, triplets and filter run once (in <sweep_dir>/_shared) and each point runs its own rwml and eval.

    rwml-jax sweep demo_rwml                    # runs/sweeps/demo_rwml/; prints the table at the end
    rwml-jax sweep demo_rwml --table            # the table so far (finished or partial sweep)
"""

from rwml_jax.config import hyper


def get_sweep():
    return "demo_cpu", hyper.product([
        hyper.sweep("rwml.learning_rate", [1e-4, 3e-4]),
        hyper.sweep("rwml.kl_coef", [0.0, 0.01]),
    ])
