"""Agent evaluation: play a policy through the env pool on ALFWorld (valid_seen / valid_unseen, generated
games) or τ²-Bench (test split) and score it (success mean ± std over runs, per task type / domain, τ²'s
pass^k, invalid actions and tool calls); `compare` builds the paper's Table 1 from the results.

`harness.evaluate` (resumable, per-episode records), `tasks` (what is played, env factories),
`policies` (expert / gold / random and model adapters), `metrics` (the arithmetic), `compare`,
`world_model` (parameter movement from the start checkpoint). Commands: `rwml-jax eval`, `rwml-jax compare`
(rwml_jax/cli_eval.py); the recipe stage: rwml_jax/train/stages/eval.py.
"""
