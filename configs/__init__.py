"""rwml-jax recipes: ``base`` (shared, commented defaults), ``models`` (shape presets), and one file per
recipe (``rwml_alfworld``, ``rwml_tau2``, ``demo_cpu``). Load them with ``rwml_jax.config.load_config``."""
