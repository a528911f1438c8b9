"""The ALFWorld recipe's RWML learning rate x KL coefficient around the paper's (1e-6, 0.01): 6 points
sharing one collect / triplets / filter (the filter's SFT model and its K samples are the costly part).

    rwml-jax sweep rwml_alfworld_lr_kl --dry-run --config.env.data_dir=$ALFWORLD_DATA
    rwml-jax sweep rwml_alfworld_lr_kl --parallel 2 --config.env.data_dir=$ALFWORLD_DATA   # 8 GPUs: 2 points x 4
"""

from rwml_jax.config import hyper


def get_sweep():
    return "rwml_alfworld", hyper.product([
        hyper.sweep("rwml.learning_rate", [5e-7, 1e-6, 2e-6]),
        hyper.sweep("rwml.kl_coef", [0.0, 0.01]),
    ])
