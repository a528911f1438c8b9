"""Training-pipeline glue: the stage loops and what they share.

* `rwml_jax.train.checkpoint`  orbax checkpoints (params, optimiser state, RNG keys, step, data cursor); atomic
* `rwml_jax.train.stage_io`    per-stage folders, atomic files / JSONL, provenance, DONE markers for reuse
* `rwml_jax.train.metrics_log` tensorboard scalars + texts, metrics.jsonl, console progress bar with ETA
* `rwml_jax.train.plots`       PNG reward curves
* `rwml_jax.train.plan`        the dry-run plan of a recipe (stages, data sizes, steps, mesh, memory)

Submodules are imported on use (nothing here), so e.g. reading stage outputs does not load orbax.
"""
